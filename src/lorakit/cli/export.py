"""`lorakit export`: an adapter for the runtimes people already use: llama.cpp / Ollama (GGUF) and vLLM."""

from __future__ import annotations

import argparse

from lorakit.cli.options import positive_int

FORMATS = ("gguf", "merged-gguf", "vllm")


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.options import CliError

    if args.format != "vllm" and (args.name or args.max_lora_rank):
        raise CliError("--name and --max-lora-rank belong to --format vllm")
    if args.format == "vllm" and (args.outtype or args.base_gguf):
        raise CliError("--outtype and --base-gguf belong to the GGUF formats (gguf, merged-gguf)")
    if args.format == "gguf":
        from lorakit.export.gguf import export_adapter_gguf

        done = export_adapter_gguf(args.run_dir, args.out, args.base, args.outtype or "f16", args.base_gguf,
                                   args.force)
        print(f"wrote {done.out}: llama.cpp LoRA adapter ({done.architecture}, {done.tensors} layers, rank "
              f"{'/'.join(map(str, done.ranks))}, alpha {done.alpha:g}) for the base {done.base}")
        if done.base_gguf is not None:
            print(f"  llama.cpp: llama-cli -m {done.base_gguf} --lora {done.out}")
        _print_modelfile(done.modelfile)
    elif args.format == "merged-gguf":
        from lorakit.export.merged_gguf import export_merged_gguf

        done = export_merged_gguf(args.run_dir, args.out, args.base, args.outtype or "f16", args.base_gguf,
                                  args.force)
        print(f"wrote {done.out}: {done.base} with {args.run_dir} merged in, one GGUF model ({done.architecture}, "
              f"{done.tensors} tensors, {args.outtype or 'f16'}; metadata from {done.metadata_from})")
        print(f"  llama.cpp: llama-cli -m {done.out}")
        _print_modelfile(done.modelfile)
    else:
        from lorakit.export.vllm import export_vllm

        done = export_vllm(args.run_dir, args.out, args.base, args.name, args.max_lora_rank, args.force)
        print(f"wrote {done.out}: adapter {done.name!r} checked against vLLM's loader; serve it with:")
        print(f"  {done.command}")
    for note in done.notes:
        print(f"note: {note}")
    return 0


def _print_modelfile(path) -> None:
    if path is not None:
        print(f"  Ollama: ollama create NAME -f {path}")


def register(sub) -> None:
    p = sub.add_parser("export", help="export an adapter for llama.cpp / Ollama (GGUF) or vLLM")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the adapter directory (the --out of `lorakit train`)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="gguf: llama.cpp's LoRA adapter file (+ Ollama Modelfile with ADAPTER); merged-gguf: base + "
                        "adapter merged into one GGUF model (+ Modelfile); vllm: a folder vLLM loads, and its "
                        "`vllm serve` line")
    p.add_argument("--out", required=True, help="the .gguf file to write (GGUF formats) or the folder (vllm)")
    p.add_argument("--outtype", choices=["f16", "f32", "q8_0"], default=None,
                   help="tensor type of the GGUF file (default f16; vectors stay f32)")
    p.add_argument("--base", default=None,
                   help="the base model (default: the one the adapter records when it is here, else smollm2)")
    p.add_argument("--base-gguf", dest="base_gguf", default=None,
                   help="the base's GGUF file (default: the embedded model's own for smollm2): the adapter is "
                        "checked against it and the Modelfile names it; merged-gguf copies its metadata")
    p.add_argument("--name", default=None, help="vllm: the adapter's name in --lora-modules (default: --out's name)")
    p.add_argument("--max-lora-rank", dest="max_lora_rank", type=positive_int, default=None,
                   help="vllm: the --max-lora-rank the server runs with (default: 16, or the smallest that fits)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
