"""Command line: `axolotl minicpmv-chat`, `axolotl minicpmv-export`, `axolotl minicpmv-serve` (Axolotl CLI plugins)
and `python -m axolotl_minicpmv {chat,export,serve,tiny-checkpoint}`."""

from __future__ import annotations

import json
import sys

import click


@click.command("minicpmv-chat")
@click.option("--model", "model_path", required=True, help="Base model: hub id or directory in the official layout.")
@click.option("--adapter", default=None, help="Adapter exported by minicpmv-export (adapter or official-lora layout).")
@click.option("--image", default=None, help="Image file for the conversation (optional; text-only without it).")
@click.option("--question", "questions", multiple=True, help="Ask these questions in turn and exit (non-interactive).")
@click.option("--beam/--sample", "beam", default=False, help="Beam search (3 beams) instead of sampling.")
@click.option("--fast", is_flag=True, help="Decode with FastDecoder: static KV cache, and on a GPU one CUDA graph per "
              "token (compiled on first use, about a minute). Sampling only, not with --beam.")
@click.option("--max-new-tokens", default=1024, show_default=True)
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", default=None, help="bfloat16, float16 or float32 (default: by device).")
def chat_command(model_path, adapter, image, questions, beam, fast, max_new_tokens, device, dtype):
    """Chat with MiniCPM-V 2.0 about an image, over several turns.

    Type a question and press Enter. `/image PATH` switches to another image (and starts a new
    conversation), `/reset` forgets the conversation, `/quit` (or Ctrl-D) leaves.
    """
    from pathlib import Path

    from .inference.chat_helper import MiniCPMVChat, img2base64

    if fast and beam:
        raise click.UsageError("--fast decodes by sampling; it cannot be combined with --beam")
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
            answer = session.chat({"image": state["image"], "question": json.dumps(msgs, ensure_ascii=False)}, sampling=not beam, max_new_tokens=max_new_tokens, fast=fast)
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
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="merged: dtype of the written weights (the merge runs in float32).")
def export_command(source, fmt, out, checkpoint, base_model, overwrite, dtype):
    """Export a finished Axolotl run (CONFIG.yml or its output_dir) as a PEFT adapter, the official
    LoRA layout (+ vpm_resampler_embedtokens.pt), or a merged checkpoint in the official format."""
    from .weights.export import export

    try:
        written = export(source, fmt, out, checkpoint=checkpoint, base_model=base_model, overwrite=overwrite, dtype=dtype)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {fmt} export to {written}:")
    for path in sorted(written.iterdir()):
        click.echo(f"  {path.name}  ({path.stat().st_size:,} bytes)")


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
@click.option("--api-key", default=None, envvar="MINICPMV_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 routes (or set MINICPMV_API_KEY).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256), help="Requests per generate call.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Requests waiting beyond the running batch; more get 503.")
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1), help="Largest picture (width x height) accepted.")
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1), help="Most new tokens per answer (and the default).")
@click.option("--max-request-bytes", default=32 * 1024 * 1024, show_default=True, type=click.IntRange(1), help="Largest request body.")
@click.option("--image-root", default=None, type=click.Path(exists=True, file_okay=False), help="Allow image_url file paths inside this folder only.")
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--dtype", default=None, type=click.Choice(["bfloat16", "float16", "float32"]), help="Default: by device.")
@click.option("--no-ui", is_flag=True, help="Do not serve the chat page at /.")
def serve_command(model_path, adapter, host, port, served_model_name, api_key, max_batch_size, max_queue, max_image_pixels,
                  max_tokens, max_request_bytes, image_root, device, dtype, no_ui):
    """Serve MiniCPM-V 2.0 with an OpenAI-compatible API (POST /v1/chat/completions) and a chat page at /."""
    from pathlib import Path

    from .serving.server import serve

    try:
        serve(model_path, adapter, host=host, port=port, model_name=served_model_name, api_key=api_key,
              max_batch_size=max_batch_size, max_queue=max_queue, max_image_pixels=max_image_pixels, max_tokens=max_tokens,
              max_request_bytes=max_request_bytes, image_root=Path(image_root) if image_root else None, device=device,
              dtype=dtype, ui=not no_ui)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None


@click.group()
def main():
    """MiniCPM-V 2.0 tools (the same commands exist as `axolotl minicpmv-chat` / `minicpmv-export` / `minicpmv-serve`)."""


main.add_command(chat_command, "chat")
main.add_command(export_command, "export")
main.add_command(tiny_checkpoint_command, "tiny-checkpoint")
main.add_command(serve_command, "serve")
