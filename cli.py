"""Command line for the pack: ``python cli.py <subcommand> --help``.

Subcommands are declared here (``bench`` in ``benchmarks/commands.py``, ``convert`` and ``convert-pickle`` in
``pipeline/weights/commands.py``) and implemented in the package; the
package is reached through ``_bootstrap`` so that none of its folders is ever imported under a top-level
name.
"""

import argparse
import sys
from pathlib import Path

import _bootstrap


def _default_models_dir() -> Path | None:
    """ComfyUI's models folder when this pack sits in ComfyUI/custom_nodes/<pack>."""
    candidate = Path(__file__).resolve().parent.parent.parent / "models"
    return candidate if candidate.is_dir() else None


def _add_download(subparsers) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch model files from Hugging Face into ComfyUI's models folders",
        description="Download exactly the model files a setup needs into the right ComfyUI models folders "
        "(diffusion_models, vae, text_encoders), resuming partial downloads. A size summary is printed "
        "first. Gated repositories (T5-Gemma, Stable Audio Open) need their terms accepted on "
        "huggingface.co and a token (--token or HF_TOKEN).",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=_default_models_dir(),
        help="ComfyUI's models folder. Default: ../../models when this pack is in ComfyUI/custom_nodes",
    )
    parser.add_argument(
        "--workflow",
        action="append",
        default=[],
        metavar="NAME",
        help="everything an example workflow needs: its short name (t2v_distill, i2v_distill, t2v_base, "
        "base_sr_540p, distill_sr_1080p, lipsync_distill, lipsync_long) or its title, the file name in "
        "workflows/ without .json; repeatable",
    )
    parser.add_argument(
        "--dit", action="append", default=[], choices=("distill", "base"), help="a base-stage DiT (FP8)"
    )
    parser.add_argument(
        "--sr", action="append", default=[], choices=("540p", "1080p"), help="a super-resolution DiT (FP8)"
    )
    parser.add_argument(
        "--files",
        nargs="+",
        default=[],
        metavar="NAME",
        help="catalogue entries by name: dit_distill, dit_base, dit_sr_540p, dit_sr_1080p, turbo_vae, "
        "wan_vae, audio_vae, text_encoder",
    )
    parser.add_argument("--all", action="store_true", help="every file in the catalogue (about 100 GB)")
    parser.add_argument("--token", default=None, help="Hugging Face token for gated repositories")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and sizes, download nothing")
    parser.set_defaults(run=_run_download)


def _run_download(args) -> int:
    from magihuman.pipeline.weights.download import DownloadError, fetch, files_for, plan, resolve

    if args.models_dir is None:
        print(
            "error: --models-dir is required (this pack is not inside ComfyUI/custom_nodes)", file=sys.stderr
        )
        return 2
    try:
        names = files_for(args.dit, args.sr, args.workflow, args.files, args.all)
        if not names:
            print("error: nothing chosen: give --workflow, --dit, --sr, --files or --all", file=sys.stderr)
            return 2
        downloads = plan(names, args.models_dir)
        resolved = [(d, *resolve(d, args.token)) for d in downloads]
        print(f"{'file':<14}{'repository':<38}{'into':<52}{'size':>10}")
        for download, _, size in resolved:
            target = str(download.target)
            print(f"{download.file.name:<14}{download.file.repo:<38}{target:<52}{size / 1e9:>8.2f} GB")
        print(f"total {sum(size for *_, size in resolved) / 1e9:.2f} GB")
        if args.dry_run:
            return 0
        for download, files, _ in resolved:
            print(f"fetching {download.file.description} into {fetch(download, files, args.token)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _progress():
    """A tqdm bar per sampling stage (one step per model call round)."""
    from tqdm import tqdm

    bars = {}

    def update(stage: str, step: int, total: int) -> None:
        name = stage.partition(" [")[0]  # one bar per stage; "[window i/n]" of a long clip shows in it
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=stage, unit="step"))
        bar.set_description(stage, refresh=False)
        bar.update(step - bar.n)
        if step == total:
            bar.close()

    return update


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a clip with real weights, without ComfyUI",
        description="Text (and optionally a reference image and/or driving audio) to video with sound, "
        "headless, through the same stages as the ComfyUI nodes. Models are taken from a ComfyUI models "
        "folder (--models-dir, the layout `download` creates) or given by path. Writes <out>.mp4 (H.264 + "
        "AAC stereo) and <out>.wav.",
    )
    parser.add_argument("--prompt", required=True, help="what happens, who says what, background sound")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the official one)")
    parser.add_argument("--image", type=Path, default=None, help="reference image for the first frame")
    parser.add_argument("--audio", type=Path, default=None, help="driving audio: the clip lip-syncs to it")
    parser.add_argument(
        "--seconds", type=float, default=4.0,
        help="length in seconds, 25 fps (default 4); past one window the clip is made window by window",
    )  # fmt: skip
    parser.add_argument(
        "--window-seconds", type=float, default=4.96,
        help="long clips: window length, a multiple of 0.16 (default 4.96 = the 5 s training length)",
    )  # fmt: skip
    parser.add_argument(
        "--overlap", type=int, default=1,
        help="long clips: latent frames each window takes clean from the previous one (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--window-prompt", action="append", default=[], metavar="PROMPT",
        help="long clips: the prompt of the next window (repeat; the last one serves the windows after it)",
    )  # fmt: skip
    parser.add_argument(
        "--no-anchor", action="store_true",
        help="long clips with --image: only the first window holds the reference image (default: every "
        "window holds it in its first latent slot, keeping the identity over the whole clip)",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=448, help="base width, multiple of 32 (default 448)")
    parser.add_argument("--height", type=int, default=256, help="base height, multiple of 32 (default 256)")
    parser.add_argument(
        "--mode", choices=("distill", "base"), default="distill",
        help="distill: 8 steps, no guidance (fast); base: 32 steps with guidance (default distill)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 8 / 32)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument(
        "--sr",
        default=None,
        metavar="540p|1080p|WxH",
        help="super-resolve to 896x512, 1920x1088 or WxH (with the 1080p SR model past 1280x720, else 540p)",
    )
    parser.add_argument(
        "--decoder", choices=("turbo", "wan", "both"), default="turbo",
        help="video decoder: the fast Turbo VAE (default), the Wan2.2 VAE, or both (writes <out>_wan.mp4)",
    )  # fmt: skip
    parser.add_argument(
        "--compute", choices=("auto", "fp8-matmul", "dequantize", "bf16"), default="auto",
        help="DiT linear layers: auto = FP8 tensor cores where the GPU has them, else dequantize",
    )  # fmt: skip
    parser.add_argument(
        "--swap-layers", type=layer_count, default="auto", metavar="N",
        help="keep N DiT layers in CPU memory and stream them in (slower); auto (default): the fewest this "
        "GPU needs for one window of the clip, none on the CPU",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument(
        "--parallel", choices=("auto", "sequence", "cfg"), default="auto",
        help="under torchrun: split each DiT call's tokens over the processes (sequence), or run the "
        "base model's two guidance branches on 2 processes (cfg); auto = cfg for --mode base on 2 "
        "processes, else sequence",
    )  # fmt: skip
    parser.add_argument(
        "--models-dir", type=Path, default=_default_models_dir(), help="ComfyUI models folder"
    )
    for name in ("dit", "sr-dit", "text-encoder", "audio-vae", "turbo-vae", "wan-vae"):
        parser.add_argument(
            f"--{name}", type=Path, default=None, help=f"path of the {name.replace('-', ' ')}"
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("output/magihuman"),
        help="the clip's name: writes <out>.mp4 and <out>.wav (an .mp4 or .wav ending is the clip's own)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.set_defaults(run=_run_generate)


def _sr_model(size: tuple[int, int] | None) -> str | None:
    """The SR DiT for a target: the 1080p model (local attention) past 1280x720, else the 540p one."""
    if size is None:
        return None
    return "1080p" if max(size) > 1280 or min(size) > 720 else "540p"


def layer_count(text: str) -> int | None:
    """--swap-layers: a number, or auto (None)."""
    return None if text == "auto" else int(text)


def _sr_size(text: str | None) -> tuple[int, int] | None:
    from magihuman.fp8.errors import InputError
    from magihuman.pipeline.sampling.sizes import SR_TARGETS

    if text is None:
        return None
    if text in SR_TARGETS:
        return SR_TARGETS[text]
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise InputError(f"--sr must be 540p, 1080p or WIDTHxHEIGHT, got {text!r}")
    return int(width), int(height)


def _parallel_plan(args, device: str):
    """Under torchrun (WORLD_SIZE > 1): join the group (NCCL on CUDA, gloo on the CPU), one GPU per local
    rank; returns (plan, device). Without torchrun: (None, device)."""
    import dataclasses
    import os

    import torch
    from magihuman.fp8.errors import InputError
    from magihuman.pipeline.dit.parallel import start_group

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if args.parallel == "cfg":
            raise InputError("--parallel cfg needs 2 processes: start with torchrun --nproc-per-node 2")
        return None, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    cfg = args.parallel == "cfg" or (args.parallel == "auto" and args.mode == "base" and world == 2)
    if cfg and (world != 2 or args.mode != "base"):
        raise InputError(f"--parallel cfg runs the base model's 2 guidance branches on 2 processes, got "
                         f"{world} processes and --mode {args.mode}")  # fmt: skip
    plan = start_group(torch.device(device))
    return dataclasses.replace(plan, cfg=cfg), device


def _run_generate(args) -> int:
    import torch
    from magihuman.fp8.errors import InputError
    from magihuman.pipeline.codecs.text_encoder import NEGATIVE_PROMPT
    from magihuman.pipeline.preflight import check_request, resolve_device
    from magihuman.pipeline.runner import ModelPaths, Request, run
    from magihuman.pipeline.sampling.windows import WindowSettings

    device = str(resolve_device(args.device))
    plan, device = _parallel_plan(args, device)
    try:
        request = Request(
            args.prompt, args.seconds, args.width, args.height, args.mode, args.seed, args.steps,
            args.negative or NEGATIVE_PROMPT, _sr_size(args.sr), args.image, args.audio, args.decoder,
            args.compute, args.swap_layers, plan,
            WindowSettings(args.window_seconds, args.overlap, args.image is not None and not args.no_anchor),
            tuple(args.window_prompt),
        )  # fmt: skip
        check_request(request)  # the values first, before the models are even looked up
        given = {
            k: getattr(args, k)
            for k in ("dit", "sr_dit", "text_encoder", "audio_vae", "turbo_vae", "wan_vae")
        }
        if args.models_dir is not None and not args.models_dir.is_dir():
            raise InputError(f"--models-dir {args.models_dir}: no such folder")
        if args.models_dir is None and (given["dit"] is None or given["text_encoder"] is None):
            raise InputError("give --models-dir (a ComfyUI models folder) or every model path")
        sr_model = _sr_model(request.sr_size)
        paths = ModelPaths.from_models_dir(args.models_dir or Path("."), args.mode, sr_model, **given)
        written = run(paths, request, args.out, device, _progress(), args.overwrite)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    for path in written:
        print(f"wrote {path}")
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on a tiny random-weight model (no download)",
        description="Builds a tiny random-weight MagiHuman stack (FP8 DiT and SR DiT, Turbo and Wan2.2 VAEs, "
        "audio VAE, T5-Gemma text encoder) in the real on-disk layouts, loads it through the real loaders, "
        "runs the distilled sampler, a super-resolution pass and both video decoders, and writes mp4 + wav. "
        "It proves the machinery, not the art: the weights are random, so the picture and sound are noise.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the results")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length (default 2)")
    parser.add_argument("--size", type=int, default=128, help="base width and height (default 128)")
    parser.add_argument("--keep-models", action="store_true", help="keep the demo models in <out>/models")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    import tempfile
    import time

    from magihuman.pipeline.demo import PROMPT, build_models, describe_models
    from magihuman.pipeline.media.outputs import check_outputs, clip_outputs
    from magihuman.pipeline.runner import ModelPaths, Request, run

    start = time.perf_counter()
    out = args.out / "magihuman_demo"
    check_outputs(list(clip_outputs(out, ("wan",)).values()), args.overwrite)  # before minutes of work
    with tempfile.TemporaryDirectory(prefix="magihuman-demo-") as scratch:
        models_dir = args.out / "models" if args.keep_models else Path(scratch)
        print("building the tiny random-weight models ...")
        build_models(models_dir)
        print(describe_models(models_dir))
        request = Request(
            PROMPT, args.seconds, args.size, args.size, sr_size=(2 * args.size, 2 * args.size), decoder="both"
        )
        paths = ModelPaths.from_models_dir(models_dir, "distill", "540p")
        written = run(paths, request, out, "cpu", _progress(), args.overwrite)
    for path in written:
        print(f"wrote {path}")
    print(
        f"demo finished in {time.perf_counter() - start:.0f} s (random weights: picture and sound are noise)"
    )
    return 0


DEBUG_HELP = "on an error, show the full traceback (normally one line)"


class OneLineParser(argparse.ArgumentParser):
    """A mistyped command line is one line too, pointing at the subcommand's help (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    _bootstrap.load()
    from magihuman.benchmarks.commands import add_bench
    from magihuman.pipeline.weights.commands import add_convert, add_convert_pickle

    parser = OneLineParser(prog="python cli.py", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    add_convert(subparsers)
    add_convert_pickle(subparsers)
    add_bench(subparsers)
    _add_download(subparsers)
    _add_generate(subparsers)
    _add_demo(subparsers)
    for sub in subparsers.choices.values():  # accepted after the subcommand too
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand, so the hint names its help
        parser._subparsers._group_actions[0].choices[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    _bootstrap.load()
    from magihuman.pipeline.failures import run_command

    return run_command(args.run, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
