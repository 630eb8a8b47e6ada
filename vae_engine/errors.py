"""The project's own exceptions: everything a user can cause raises one of these."""


class VaeEngineError(Exception):
    """A problem the user can fix (bad path, bad file, wrong shape); the CLI prints it as one line."""


class DataError(VaeEngineError):
    """A dataset file or input array is missing, corrupt or malformed."""


class ModelDirError(VaeEngineError):
    """A model directory is missing files or holds files that do not belong together."""


class ExportError(VaeEngineError):
    """ONNX export or its validation against PyTorch failed."""
