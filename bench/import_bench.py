"""Imported VAEs at the engine's speed: the Stable Diffusion VAE architecture (diffusers AutoencoderKL,
block_out_channels (128, 256, 512, 512), 2 layers per block, 4 latent channels; random weights from its config, no
network) imported with `vae-engine import`, then encode and decode of real photos on every CPU path against
diffusers' own eager PyTorch, in one run, warmed up, threads set explicitly.

    python bench/import_bench.py --size 256 --images 4 --threads 2 [--out bench/results/import_bench.json]

Each row: seconds per image (median of the rounds), images/s, the ratio to diffusers' eager PyTorch, GFLOP/s
(the graph's convolution and matrix-product multiply-adds, 2 FLOP each) against this machine's GEMM peak for the
precision, measured in the same run; and each path's accuracy cost against diffusers fp32, in the model's own
terms (it declares no likelihood, so no nats): the latents' largest and mean absolute error (in units of the
scaled latents) and the decoded images' mean absolute error and PSNR change (pixels in [0, 1])."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "import-table-{size}"  # the generated tables of docs/benchmarks/imported.md, one per image size
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              scaling_factor=0.18215)


def _timed(fn, rounds: int) -> float:
    fn()  # warm-up: sessions, compiled kernels, first-touch memory
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds))


def run(size: int, images: int, threads: int, rounds: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from vae_engine import Engine
    from vae_engine.core import hardware
    from vae_engine.data import sample_photos as photos
    from vae_engine.export.imported import export_variants, import_diffusers
    from vae_engine.modeldir import graphs, versions
    from vae_engine.perf.peaks import gemm_peak
    from vae_engine.runtime import backends

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="import-bench-"))
    vae = AutoencoderKL(sample_size=size, **SD_VAE).eval()
    vae.save_pretrained(tmp / "sd-vae")
    t0 = time.perf_counter()
    import_diffusers(tmp / "sd-vae", tmp / "model", (size, size))
    import_s = time.perf_counter() - t0
    model = tmp / "model"
    graph_errors = json.loads((model / "export_report.json").read_text())["max_abs_err_vs_torch"]
    x = photos((3, size, size), images)
    sf = vae.config.scaling_factor

    with torch.inference_mode():  # diffusers as its users run it: the reference and the baseline
        xt = torch.from_numpy(x).reshape(images, 3, size, size) * 2 - 1
        ref_z = (vae.encode(xt).latent_dist.mean * sf).numpy()
        ref_img = (vae.decode(torch.from_numpy(ref_z) / sf).sample / 2 + 0.5).clamp(0, 1).numpy()

    def diffusers_encode():
        with torch.inference_mode():
            return vae.encode(xt).latent_dist.mean * sf

    def diffusers_decode():
        with torch.inference_mode():
            return vae.decode(torch.from_numpy(ref_z) / sf).sample

    cfg = Engine.load(model, backend="onnxruntime").cfg  # multiply-adds counted on the graphs (shape-inferred)
    cfg_macs = {role: graphs.graph_macs(graphs.load_graph(graphs.graph_path(model, role), role, cfg))["float"]
                for role in graphs.ROLES}
    peaks = {p: max(v.values()) for p, v in gemm_peak(threads, min_time=0.3).items()}
    rows = [{"path": "diffusers eager (PyTorch fp32)", "precision": "fp32",
             "encode_s": _timed(diffusers_encode, rounds) / images,
             "decode_s": _timed(diffusers_decode, rounds) / images,
             "latent_max_abs_err": 0.0, "latent_mean_abs_err": 0.0, "image_mean_abs_err": 0.0}]
    paths = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("torch", "bf16")]
    for backend, precision in paths:
        why = backends.unavailable(backend, precision, "cpu", model)
        if why or (precision == "bf16" and not hardware.native_bf16()):
            rows.append({"path": f"{backend}/{precision}", "precision": precision,
                         "skipped": why or "no native bf16 on this CPU (emulated bf16 is slower than fp32)"})
            continue
        engine = Engine.load(model, backend=backend, precision=precision, threads=threads)
        rows.append(_row(f"{backend}/{precision}", precision, engine, x, ref_z, ref_img, rounds))
    # int8 of every convolution and matrix product (static QDQ, calibrated as export calibrates): its speed and cost
    every = _every_layer_int8(model, tmp / "int8-every-layer")
    engine = Engine.load(every, backend="onnxruntime", precision="int8", threads=threads)
    rows.append(_row("onnxruntime/int8, every layer (QDQ)", "int8", engine, x, ref_z, ref_img, rounds))
    # what export keeps within auto's budget (the search; a graph keeps int8 layers only where they make it faster)
    t0 = time.perf_counter()
    q = export_variants(model, quantize="int8")["int8"]
    export_int8 = {"seconds": time.perf_counter() - t0, "kept": {r: len(v) for r, v in q["int8_layers"].items()},
                   "layers": q["layers"], "trials": q["trials"], "speedup": q["speedup_vs_fp32_one_item"],
                   "accuracy": q["accuracy"], "warnings": q.get("warnings", [])}
    if graphs.graph_path(model, "encoder", "int8").is_file():
        engine = Engine.load(model, backend="onnxruntime", precision="int8", threads=threads)
        rows.append(_row("onnxruntime/int8, export's layers", "int8", engine, x, ref_z, ref_img, rounds))
    # what `--precision auto` picks here (its accuracy measured on sample photos, within the reconstruction budget)
    t0 = time.perf_counter()
    auto = Engine.load(model, precision="auto", threads=threads, batch_size=images)
    decide_s = time.perf_counter() - t0
    rows.append({**_row(f"auto -> {auto.backend.name}/{auto.backend.precision}", auto.backend.precision, auto, x,
                        ref_z, ref_img, rounds), "decide_s": decide_s, "auto_path": auto.path})
    base = rows[0]
    for row in rows:
        if "encode_s" not in row:
            continue
        peak = peaks.get(row["precision"] if row["precision"] in ("bf16", "int8") else "fp32")
        for op, role in (("encode", "encoder"), ("decode", "decoder")):
            gflops = 2 * cfg_macs[role] / row[f"{op}_s"] / 1e9
            row[f"{op}_images_per_s"] = 1 / row[f"{op}_s"]
            row[f"{op}_vs_diffusers"] = base[f"{op}_s"] / row[f"{op}_s"]
            row[f"{op}_gflops"] = gflops
            row[f"{op}_of_peak"] = gflops / peak if peak else None
    return {"benchmark": "import_bench", "date": time.strftime("%Y-%m-%d"), "size": size, "images": images,
            "threads": threads, "rounds": rounds, "import_s": import_s,
            "import_graph_errors": graph_errors,
            "machine": {"cpu": hardware.cpu_info()[0], "flags": hardware.key_flags(),
                        "python": platform.python_version()},
            "versions": {k: v for k, v in versions().items() if v} | {"diffusers": __import__("diffusers").__version__},
            "gemm_peaks_gflops": peaks, "macs_per_image": cfg_macs, "rows": rows, "export_int8": export_int8,
            "command": f"python bench/import_bench.py --size {size} --images {images} --threads {threads} "
                       f"--rounds {rounds}"}


def _row(path: str, precision: str, engine, x: np.ndarray, ref_z: np.ndarray, ref_img: np.ndarray, rounds: int) -> dict:
    """One path's seconds per image (encode of the photos, decode of diffusers' latents) and its errors against
    diffusers fp32."""
    n = len(x)
    z, img = engine.encode(x)[0], engine.decode(ref_z)
    return {"path": path, "precision": precision,
            "encode_s": _timed(lambda: engine.encode(x), rounds) / n,
            "decode_s": _timed(lambda: engine.decode(ref_z), rounds) / n,
            "latent_max_abs_err": float(np.abs(z - ref_z.reshape(n, -1)).max()),
            "latent_mean_abs_err": float(np.abs(z - ref_z.reshape(n, -1)).mean()),
            "image_mean_abs_err": float(np.abs(img - ref_img.reshape(n, -1)).mean())}


def _every_layer_int8(model: Path, out: Path) -> Path:
    """A copy of the model folder whose int8 graphs quantize every layer export could (no accuracy search)."""
    import shutil

    from vae_engine.export import imported, qdq
    from vae_engine.modeldir import graphs, model_config

    shutil.copytree(model, out)
    cfg = model_config(model)
    fp32 = {role: graphs.load_graph(graphs.graph_path(model, role), role, cfg).proto() for role in graphs.ROLES}
    feeds, _ = imported.calibration_feeds(fp32, cfg)
    for role in graphs.ROLES:
        proto = qdq.quantize(fp32[role], qdq.ranges(fp32[role], feeds[role]), qdq.layers(fp32[role]))
        graphs.graph_path(out, role, "int8").write_bytes(proto.SerializeToString())
    return out


def _rate(row: dict, op: str) -> str:
    frac = row.get(f"{op}_of_peak")
    return f"{row[f'{op}_gflops']:.0f}" + (f" ({100 * frac:.0f}%)" if frac else "")


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    about = (f"Machine: {m['cpu']} (flags: {', '.join(m['flags']) or 'none of note'}), {report['threads']} threads; "
             f"{report['date']}; Python {m['python']}, torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
             f"openvino {v.get('openvino')}, diffusers {v.get('diffusers')}. Command: `{report['command']}`. "
             f"{report['size']}x{report['size']} photos, {report['images']} per call, median of "
             f"{report['rounds']} rounds after a warm-up; the import itself took {report['import_s']:.0f} s.\n\n")
    head = about + ("| path | encode s/image | x diffusers | GFLOP/s (of peak) | decode s/image | x diffusers | "
            "GFLOP/s (of peak) | latent max/mean abs err | image mean abs err |\n" + "| --- " * 9 + "|\n")
    lines = []
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['path']} | skipped: {r['skipped']} |" + " |" * 7)
            continue
        lines.append(f"| {r['path']} | {r['encode_s']:.2f} | {r['encode_vs_diffusers']:.2f}x | {_rate(r, 'encode')} | "
                     f"{r['decode_s']:.2f} | {r['decode_vs_diffusers']:.2f}x | {_rate(r, 'decode')} | "
                     f"{r['latent_max_abs_err']:.1e} / {r['latent_mean_abs_err']:.1e} | "
                     f"{r['image_mean_abs_err']:.1e} |")
    auto = next((r for r in report["rows"] if "auto_path" in r), None)
    tail = f"\n`--precision auto` chose {auto['auto_path']}; deciding took {auto['decide_s']:.0f} s.\n" if auto else ""
    q = report.get("export_int8")
    if q:
        tail += (f"\n`vae-engine export MODEL --quantize int8` ({q['seconds']:.0f} s, {q['trials']['encoder']} + "
                 f"{q['trials']['decoder']} layer sets tried) kept {q['kept']['encoder']} of {q['layers']['encoder']} "
                 f"encoder and {q['kept']['decoder']} of {q['layers']['decoder']} decoder layers in int8"
                 + (f" ({'; '.join(q['warnings'])})" if q["warnings"] else "") + ".\n")
    return head + "\n".join(lines) + "\n" + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the report's JSON here")
    parser.add_argument("--page", type=Path, default=None, help="write the table into this docs page's section")
    args = parser.parse_args()
    report = run(args.size, args.images, args.threads, args.rounds)
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.page:
        from vae_engine.perf import pages

        pages.write_section(args.page, SECTION.format(size=args.size), markdown(report))
        print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
