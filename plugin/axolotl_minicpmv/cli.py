"""Command line: `axolotl minicpmv-chat`, `minicpmv-export`, `minicpmv-predict`, `minicpmv-serve` (Axolotl CLI plugins)
and `python -m axolotl_minicpmv {chat,export,predict,serve,tiny-checkpoint}`."""

from __future__ import annotations

import json
import sys

import click

from .inference.chat_helper import DTYPE_NAMES

DTYPE_CHOICE = click.Choice(DTYPE_NAMES)


@click.command("minicpmv-chat")
@click.option("--model", "model_path", required=True, help="Base model: hub id or directory in the official layout.")
@click.option("--adapter", default=None, help="Adapter exported by minicpmv-export (adapter or official-lora layout).")
@click.option("--image", default=None, help="Image file for the conversation (optional; text-only without it).")
@click.option("--question", "questions", multiple=True, help="Ask these questions in turn and exit (non-interactive).")
@click.option("--beam/--sample", "beam", default=False, help="Beam search (3 beams) instead of sampling.")
@click.option(
    "--fast",
    is_flag=True,
    help="The fastest path: on a GPU the decoding step, prefill and vision tower compiled on first use (minutes). "
    "Without it a GPU decodes through the eager step recorded as a CUDA graph (no compilation).",
)
@click.option("--max-new-tokens", default=1024, show_default=True)
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", default=None, type=DTYPE_CHOICE, help="Default: by device.")
def chat_command(model_path, adapter, image, questions, beam, fast, max_new_tokens, device, dtype):
    """Chat with MiniCPM-V 2.0 about an image, over several turns.

    Type a question and press Enter. `/image PATH` switches to another image (and starts a new
    conversation), `/reset` forgets the conversation, `/quit` (or Ctrl-D) leaves.
    """
    from pathlib import Path

    from .inference.chat_helper import MiniCPMVChat, img2base64

    if image and not Path(image).is_file():
        raise click.ClickException(f"--image {image!r}: no such file")
    try:
        session = MiniCPMVChat(model_path, adapter=adapter, device=device, dtype=dtype)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    state = {"image": img2base64(image) if image else None, "msgs": []}

    def ask(question: str) -> None:
        msgs = state["msgs"] + [{"role": "user", "content": question}]
        try:
            answer = session.chat(
                {"image": state["image"], "question": json.dumps(msgs, ensure_ascii=False)},
                sampling=not beam,
                max_new_tokens=max_new_tokens,
                fast=True if fast else None,  # None: chat()'s default for the device
            )
        except (ValueError, OSError) as err:  # bad input: say why and keep the session
            click.echo(f"error: {err}", err=True)
            return
        state["msgs"] = msgs + [{"role": "assistant", "content": answer}]
        click.echo(f"assistant: {answer}")

    for question in questions:
        click.echo(f"user: {question}")
        ask(question)
    if questions:
        return
    click.echo("MiniCPM-V chat. /image PATH, /reset, /quit")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: click.prompt("user", default="", show_default=False), None):
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            state["msgs"] = []
            continue
        if line.startswith("/image "):
            try:
                state["image"], state["msgs"] = img2base64(line[len("/image ") :].strip()), []
            except OSError as err:
                click.echo(f"error: {err}", err=True)
            continue
        ask(line)


@click.command("minicpmv-export")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["adapter", "official-lora", "merged"]), required=True)
@click.option("--out", required=True, help="Directory to write (must not exist or be empty, unless --overwrite).")
@click.option("--checkpoint", default=None, help="Export this checkpoint (e.g. checkpoint-20) instead of the final adapter.")
@click.option("--base-model", default=None, help="Base model (defaults to base_model of the run's config).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option(
    "--dtype",
    type=DTYPE_CHOICE,
    default="bfloat16",
    show_default=True,
    help="merged: dtype of the written weights (the merge runs in float32).",
)
@click.option("--for-vllm", is_flag=True, help="merged: add what `vllm serve OUT` needs (config version, chat template).")
def export_command(source, fmt, out, checkpoint, base_model, overwrite, dtype, for_vllm):
    """Export a finished Axolotl run (CONFIG.yml or its output_dir) as a PEFT adapter, the official
    LoRA layout (+ vpm_resampler_embedtokens.pt), or a merged checkpoint in the official format."""
    from .serving.vllm.export import prepare_for_vllm
    from .weights.export import export

    if for_vllm and fmt != "merged":
        raise click.ClickException(f"--for-vllm needs --format merged (vLLM serves merged checkpoints), not {fmt!r}")
    try:
        written = export(source, fmt, out, checkpoint=checkpoint, base_model=base_model, overwrite=overwrite, dtype=dtype)
        if for_vllm:
            prepare_for_vllm(written)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {fmt} export to {written}:")
    for path in sorted(written.iterdir()):
        click.echo(f"  {path.name}  ({path.stat().st_size:,} bytes)")


@click.command("minicpmv-predict")
@click.argument("source", required=False)
@click.option("--model", "model_path", default=None, help="Base model: hub id or directory (with SOURCE: overrides the run's base_model).")
@click.option("--adapter", default=None, help="Adapter (minicpmv-export output, or an Axolotl output_dir / checkpoint-N).")
@click.option("--checkpoint", default=None, help="With SOURCE: use this checkpoint (e.g. checkpoint-20) instead of the final adapter.")
@click.option(
    "--data",
    required=True,
    help="Samples in any training format: a JSON, JSONL, Parquet or Arrow file, or a save_to_disk folder (optional `answers` list).",
)
@click.option("--out", required=True, help="Predictions JSONL, one line per answered turn, written as each completes.")
@click.option("--metrics-out", default=None, help="Write the summary (counts, metric means, speed, command, versions) as JSON here.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--greedy",
    "decoding",
    flag_value="greedy",
    default=True,
    help="Greedy decoding, exactly chat(sampling=False, num_beams=1) (the default: reproducible scores).",
)
@click.option("--sampling", "decoding", flag_value="sampling", help="Sample with chat's defaults (top_p 0.8, top_k 100, temperature 0.7).")
@click.option("--num-beams", default=None, type=click.IntRange(min=1), help="Beam search with N beams (chat's repetition penalty 1.2).")
@click.option("--metrics", default="exact,vqa,anls,rouge_l", show_default=True, help="Comma-separated: exact, vqa, anls, rouge_l.")
@click.option(
    "--turns",
    type=click.Choice(["last", "all"]),
    default="last",
    show_default=True,
    help="Answer the last assistant turn of each sample, or every one (given the reference turns before it).",
)
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N predictions.")
@click.option("--resume", is_flag=True, help="Keep the rows already in --out and predict only the rest.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--strict", is_flag=True, help="Stop at the first bad row (exit 1) instead of writing it with `error`.")
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="Default: by device (float32 on CPU).")
@click.option("--max-inp-length", default=2048, show_default=True, type=click.IntRange(min=1), help="Longer prompts are bad rows.")
@click.option(
    "--max-slice-nums", default=None, type=click.IntRange(1, 9), help="Default: the run's minicpmv_max_slice_nums, else the model's."
)
@click.option("--seed", default=None, type=int, help="Seed for --sampling.")
def predict_command(
    source,
    model_path,
    adapter,
    checkpoint,
    data,
    out,
    metrics_out,
    batch_size,
    max_new_tokens,
    decoding,
    num_beams,
    metrics,
    turns,
    limit,
    resume,
    overwrite,
    strict,
    device,
    dtype,
    max_inp_length,
    max_slice_nums,
    seed,
):
    """Answer every sample of --data (batched), score the answers and write one JSON line per prediction.

    SOURCE (optional) is an Axolotl run, its CONFIG.yml or output_dir: its base model and trained adapter are used.
    The last line printed is the summary.
    """
    import logging

    from .inference.metrics import parse_metrics
    from .integration.predict import PredictionError, run_prediction, summary_line

    if decoding == "sampling" and num_beams is not None:
        raise click.UsageError("--sampling and --num-beams exclude each other (beam search does not sample)")
    if source is None and model_path is None:
        raise click.UsageError("pass --model DIR (and --adapter DIR), or an Axolotl run: CONFIG.yml or its output_dir")
    if source is not None and adapter is not None:
        raise click.UsageError("SOURCE brings its own adapter; drop --adapter (or drop SOURCE and pass --model and --adapter)")
    try:
        parse_metrics(metrics)
    except ValueError as err:
        raise click.UsageError(f"--metrics: {err}") from None
    log = logging.getLogger("axolotl_minicpmv.predict")  # progress lines and warnings go to stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        summary = run_prediction(
            data=data,
            out=out,
            model_path=model_path,
            adapter=adapter,
            source=source,
            checkpoint=checkpoint,
            metrics_out=metrics_out,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sampling=decoding == "sampling",
            num_beams=num_beams or 1,
            metrics=metrics,
            turns=turns,
            limit=limit,
            resume=resume,
            overwrite=overwrite,
            strict=strict,
            device=device,
            dtype=dtype,
            max_inp_length=max_inp_length,
            max_slice_nums=max_slice_nums,
            seed=seed,
            command=_command_line(),
        )
    except (PredictionError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary_line(summary, out))


def _command_line() -> str:
    """The command as typed (`python -m axolotl_minicpmv ...` rather than the path of __main__.py)."""
    import shlex
    from pathlib import Path

    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", "axolotl_minicpmv"]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


@click.command("tiny-checkpoint")
@click.argument("out_dir")
@click.option("--seed", default=0, show_default=True)
@click.option("--full-size", is_flag=True, help="Official sizes (2.8B parameters) with random weights, for benchmarks.")
def tiny_checkpoint_command(out_dir, seed, full_size):
    """Write a tiny random MiniCPM-V 2.0 checkpoint in the official layout (for tests and offline demos)."""
    from .testing.tiny_checkpoint import make_tiny_checkpoint

    click.echo(f"wrote {make_tiny_checkpoint(out_dir, seed=seed, full_size=full_size)}")


@click.command("minicpmv-serve")
@click.option("--model", "model_path", required=True, help="Base model or merged export: hub id or directory in the official layout.")
@click.option("--adapter", default=None, help="Adapter exported by minicpmv-export, served unmerged on top of --model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback exposes the server.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--served-model-name", default=None, help="The `model` name clients send (default: the adapter's or model's folder name).")
@click.option(
    "--api-key",
    default=None,
    envvar="MINICPMV_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1 routes (or set MINICPMV_API_KEY).",
)
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Requests per generate call.")
@click.option(
    "--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Requests waiting beyond the running batch; more get 503."
)
@click.option(
    "--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1), help="Largest picture (width x height) accepted."
)
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1), help="Most new tokens per answer (and the default).")
@click.option(
    "--max-model-len",
    default=2048,
    show_default=True,
    type=click.IntRange(2),
    help="Most tokens of prompt plus answer per request (as in vLLM); the fast path is compiled for it at start-up.",
)
@click.option("--max-request-bytes", default=32 * 1024 * 1024, show_default=True, type=click.IntRange(1), help="Largest request body.")
@click.option(
    "--image-root", default=None, type=click.Path(exists=True, file_okay=False), help="Allow image_url file paths inside this folder only."
)
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", default=None, type=DTYPE_CHOICE, help="Default: by device.")
@click.option("--no-ui", is_flag=True, help="Do not serve the chat page at /.")
def serve_command(
    model_path,
    adapter,
    host,
    port,
    served_model_name,
    api_key,
    max_batch_size,
    max_queue,
    max_image_pixels,
    max_tokens,
    max_model_len,
    max_request_bytes,
    image_root,
    device,
    dtype,
    no_ui,
):
    """Serve MiniCPM-V 2.0 with an OpenAI-compatible API (POST /v1/chat/completions) and a chat page at /."""
    from pathlib import Path

    from .serving.server import serve

    try:
        serve(
            model_path,
            adapter,
            host=host,
            port=port,
            model_name=served_model_name,
            api_key=api_key,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_image_pixels=max_image_pixels,
            max_tokens=max_tokens,
            max_model_len=max_model_len,
            max_request_bytes=max_request_bytes,
            image_root=Path(image_root) if image_root else None,
            device=device,
            dtype=dtype,
            ui=not no_ui,
        )
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None


@click.group()
def main():
    """MiniCPM-V 2.0 tools (the same commands exist as `axolotl minicpmv-chat` / `-export` / `-predict` / `-serve`)."""


main.add_command(chat_command, "chat")
main.add_command(export_command, "export")
main.add_command(predict_command, "predict")
main.add_command(tiny_checkpoint_command, "tiny-checkpoint")
main.add_command(serve_command, "serve")
