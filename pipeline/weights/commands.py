"""The weight-file subcommands of ``cli.py``: ``convert`` (an FP32/BF16 checkpoint to FP8) and
``convert-pickle`` (a refused .pth/.ckpt rewritten as .safetensors); their arguments and runners, thin calls
into ``fp8.convert`` and this package's pickle reader (imported when run, so ``--help`` stays fast)."""

import sys
from pathlib import Path


def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an FP32/BF16 checkpoint to FP8",
        description=(
            "Convert an FP32/BF16 safetensors checkpoint (a sharded folder with "
            "model.safetensors.index.json, or a single file) to FP8 (float8_e4m3fn), streaming tensor by "
            "tensor. Quantized: tensors with 2+ dims, at least --min-elements elements and no 'norm', "
            "'bands', 'bias' or 'embedder' in their name (on the MagiHuman DiT: exactly the 160 block "
            "GEMMs); everything else is stored in bf16. Prints the mean relative error "
            "mean|q*s - W| / mean|W| of every quantized tensor."
        ),
    )
    parser.add_argument(
        "--input",
        required=True,
        type=Path,
        help="checkpoint folder (sharded or one file) or .safetensors file",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="new or empty folder for the FP8 checkpoint"
    )
    parser.add_argument(
        "--min-elements",
        type=int,
        default=1 << 20,
        metavar="N",
        help="smallest tensor (in elements) to quantize (default: 1048576 = 2^20, as published)",
    )
    parser.add_argument(
        "--format",
        choices=("published", "comfy"),
        default="published",
        help="published: the shard names of the input, '<key>.__fp8_scale' scales and an index with "
        "metadata.quantization (as SanDiegoDude/daVinci-MagiHuman-FP8); comfy: one file in ComfyUI v0.29 "
        "naming ('<module>.weight_scale', _quantization_metadata in its header). Default: published",
    )
    parser.add_argument(
        "--scales",
        choices=("tensor", "expert", "row"),
        default="tensor",
        help="tensor: one scale per weight (as published); expert: one per modality expert of the stacked "
        "sandwich-layer weights; row: one per output row (most precise; needs --format published). "
        "Default: tensor",
    )
    parser.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from tqdm import tqdm

    from ...fp8.convert import ConvertOptions, convert_checkpoint

    try:
        options = ConvertOptions(args.min_elements, args.format, args.scales)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="converting") as bar:

        def on_tensor(report, done, total):
            bar.total = total
            bar.update(done - bar.n)
            if report.relative_error is not None:
                shape = "x".join(map(str, report.shape))
                bar.write(f"{report.key}  [{shape}]  rel_err {report.relative_error:.2%}")

        try:
            result = convert_checkpoint(args.input, args.output, options, on_tensor)
        except ValueError as e:  # CheckpointError and bad tensors: the message names the file and key
            bar.close()
            print(f"error: {e}", file=sys.stderr)
            return 1
    quantized = result.quantized
    source = sum(t.source_bytes for t in result.tensors)
    stored = sum(t.stored_bytes for t in result.tensors)
    worst = max(quantized, key=lambda t: t.relative_error, default=None)
    print(
        f"quantized {len(quantized)} tensors, kept {len(result.tensors) - len(quantized)} (bf16 or as stored)"
    )
    print(f"tensor data {source / 1e9:.3f} GB -> {stored / 1e9:.3f} GB")
    if worst is not None:
        print(
            f"mean relative error {result.mean_relative_error:.2%} "
            f"(worst {worst.relative_error:.2%}: {worst.key})"
        )
    for path in result.files:
        print(f"wrote {path}")
    return 0


def add_convert_pickle(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-pickle",
        help="rewrite a refused .pth/.ckpt as .safetensors (lists what it would import; trusted files only)",
        description="The loaders read .pth/.ckpt files with torch.load(weights_only=True) and refuse files "
        "whose pickle would import anything beyond tensor rebuilding, since unpickling those runs code. This "
        "lists every global the file would import (read from its opcodes, nothing is run), then rewrites it "
        "once as a .safetensors of its weights (ema_state_dict, state_dict or model when present, else the "
        "top level), which the loaders then read instead. A file that imports code is only unpickled with "
        "--trust-pickle: that executes whatever code it carries, so give it only for a source you trust.",
    )
    parser.add_argument("--input", required=True, type=Path, help="the .pth or .ckpt file")
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="the .safetensors to write; for a Turbo VAE put it in the turbo_vae/ folder (it is then "
        "preferred over the .ckpt)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle a file that imports code (runs that code); only for a source you trust",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=_run_convert_pickle)


def _run_convert_pickle(args) -> int:
    from .pickle_scan import scan_pickle
    from .torch_files import convert_pickle

    if args.output.suffix != ".safetensors":
        print(f"error: --output must end in .safetensors, got {args.output}", file=sys.stderr)
        return 2
    scan = scan_pickle(args.input)  # before anything is loaded: say what the file would import
    print(f"{args.input} imports: {', '.join(scan.globals) or 'nothing'}")
    if scan.code:
        print(f"  code beyond tensor rebuilding: {', '.join(scan.code)}")
    count, _ = convert_pickle(args.input, args.output, args.trust_pickle, args.overwrite)
    print(f"wrote {count} tensors to {args.output}")
    return 0
