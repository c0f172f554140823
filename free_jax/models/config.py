"""Model configuration: one frozen dataclass, converted to and from Hugging Face `T5Config`.

Axis legend used in docstrings and shape comments throughout free_jax:

    B batch, S source (encoder) length, T target (decoder) length,
    Q new decoder positions in one call,
    K pending-buffer capacity, L decoder blocks, D model dim (d_model), H heads, Dh head dim (d_kv),
    F feed-forward dim (d_ff), V vocabulary, NB relative-attention buckets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from free_jax.errors import ConfigError

_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
_MODEL_TYPES = ("t5", "mt5", "longt5")
# Encoder self-attention: "full" is T5's; LongT5 encoders use one of the other two.
ENCODER_ATTENTION_TYPES = ("full", "local", "transient-global")
LONGT5_ATTENTION_TYPES = ("local", "transient-global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Architecture of a T5-family encoder-decoder (T5 v1.0, v1.1, Flan-T5, mT5, LongT5).

    Hashable, so it can be a static argument of jitted functions.

    Attributes:
      vocab_size: V.
      d_model: D, the residual-stream width.
      d_kv: Dh, the width of one attention head (`H * Dh` need not equal D).
      d_ff: F, the feed-forward width.
      num_layers: encoder blocks.
      num_decoder_layers: L, decoder blocks (may differ from `num_layers`).
      num_heads: H.
      relative_attention_num_buckets: NB.
      relative_attention_max_distance: distance beyond which relative positions share a bucket.
      layer_norm_epsilon: RMS-norm epsilon.
      dense_act_fn: activation of the feed-forward block.
      is_gated_act: gated feed-forward (`wi_0`, `wi_1`) as in v1.1, or plain (`wi`) as in v1.0.
      tie_word_embeddings: True when the LM head is the input embedding matrix (no separate head).
      scale_decoder_outputs: multiply the decoder output by `d_model**-0.5` before the LM head
        (T5 v1.0 does; v1.1, Flan-T5 and mT5 do not).
      pad_token_id, eos_token_id, decoder_start_token_id: special token ids.
      max_source_length: longest encoder input the model accepts, or None for no limit. T5's
        relative positions have no hard limit; checkpoints that declare `n_positions` get it here.
      model_type: "t5", "mt5" or "longt5" (kept for export).
      encoder_attention_type: "full" (T5, mT5: every position attends to every other), or for
        LongT5 "local" (each position attends to `local_radius` positions on either side) or
        "transient-global" (local, plus one global token per `global_block_size` positions).
      local_radius: LongT5's one-sided local attention window; the encoder works on blocks of
        `local_radius + 1` positions. Unused by "full" attention.
      global_block_size: positions summed into one transient global token. Unused unless
        `encoder_attention_type == "transient-global"`.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    max_source_length: int | None = None
    model_type: str = "t5"
    encoder_attention_type: str = "full"
    local_radius: int = 127
    global_block_size: int = 16

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "local_radius",
            "global_block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"T5Config.{name} must be a positive integer, got {value!r}.")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                "T5Config.relative_attention_num_buckets must be at least 4 (bidirectional "
                f"buckets are split in halves twice), got {self.relative_attention_num_buckets}."
            )
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ConfigError(
                f"T5Config.dense_act_fn={self.dense_act_fn!r} is not supported; "
                f"valid: {_ACTIVATIONS}."
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(
                f"T5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}."
            )
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"T5Config.{name}={value} is outside the vocabulary [0, {self.vocab_size})."
                )
        if self.max_source_length is not None and self.max_source_length < 1:
            raise ConfigError(
                f"T5Config.max_source_length must be None or >= 1, got {self.max_source_length}."
            )
        if self.model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"T5Config.model_type={self.model_type!r} is not supported; valid: {_MODEL_TYPES}."
            )
        attention = self.encoder_attention_type
        if attention not in ENCODER_ATTENTION_TYPES:
            raise ConfigError(
                f"T5Config.encoder_attention_type={attention!r} is not supported; "
                f"valid: {ENCODER_ATTENTION_TYPES}."
            )
        if self.model_type == "longt5" and attention not in LONGT5_ATTENTION_TYPES:
            raise ConfigError(
                f"T5Config.encoder_attention_type={attention!r} does not fit model_type='longt5'; "
                f"LongT5 encoders use one of {LONGT5_ATTENTION_TYPES}."
            )
        if self.model_type != "longt5" and attention != "full":
            raise ConfigError(
                f"T5Config.encoder_attention_type={attention!r} needs model_type='longt5'; "
                f"model_type={self.model_type!r} encoders use 'full' attention."
            )

    @property
    def inner_dim(self) -> int:
        """H * Dh, the width of the attention projections."""
        return self.num_heads * self.d_kv

    @property
    def feed_forward_proj(self) -> str:
        """The Hugging Face spelling of the feed-forward type ("relu", "gated-gelu", ...)."""
        act = "gelu" if self.dense_act_fn == "gelu_new" and self.is_gated_act else self.dense_act_fn
        return f"gated-{act}" if self.is_gated_act else act

    @property
    def is_longt5(self) -> bool:
        return self.model_type == "longt5"

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face conversion

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> T5Config:
        """Builds a config from a Hugging Face `config.json` dictionary (4.x or 5.x conventions).

        transformers 5.x records the v1.0 output rescale as `scale_decoder_outputs` and always ties;
        4.x checkpoints say `tie_word_embeddings` (True for v1.0, False for v1.1/mT5) and mean both
        "share the head" and "rescale". The head itself is decided by the weights (no
        `lm_head.weight` means tied); here `tie_word_embeddings` is only the config's claim.
        """
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"config.json has model_type={model_type!r}; free_jax loads T5-family models "
                f"with model_type in {_MODEL_TYPES}."
            )
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(
                f"config.json feed_forward_proj={proj!r} is invalid; expected 'ACT' or 'gated-ACT'."
            )
        is_gated = parts[0] == "gated"
        act = parts[-1]
        if proj == "gated-gelu":  # Hugging Face maps this spelling to the tanh approximation.
            act = "gelu_new"
        act = hf.get("dense_act_fn", act)
        tie = hf.get("tie_word_embeddings", True)
        scale = hf.get("scale_decoder_outputs", tie is not False)
        eos = hf.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        num_layers = hf.get("num_layers", 6)
        n_positions = hf.get("n_positions")
        pad = hf.get("pad_token_id", 0)
        pad = 0 if pad is None else pad
        start = hf.get("decoder_start_token_id")
        long = {}
        if model_type == "longt5":  # defaults as in transformers' LongT5Config
            long = dict(
                encoder_attention_type=hf.get("encoder_attention_type", "local"),
                local_radius=hf.get("local_radius", 127),
                global_block_size=hf.get("global_block_size", 16),
            )
        return cls(
            vocab_size=hf.get("vocab_size", 32128),
            d_model=hf.get("d_model", 512),
            d_kv=hf.get("d_kv", 64),
            d_ff=hf.get("d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
            num_heads=hf.get("num_heads", 8),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            dense_act_fn=act,
            is_gated_act=is_gated,
            tie_word_embeddings=tie is not False,
            scale_decoder_outputs=bool(scale),
            pad_token_id=pad,
            eos_token_id=1 if eos is None else eos,
            decoder_start_token_id=pad if start is None else start,
            max_source_length=n_positions if isinstance(n_positions, int) else None,
            model_type=model_type,
            **long,
        )

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> T5Config:
        """Builds a config from a `transformers` config object."""
        return cls.from_hf_dict(hf_config.to_dict())

    def to_hf_dict(self) -> dict[str, Any]:
        """A 4.x-style `config.json` dictionary that transformers 4.x and 5.x both read correctly.

        Untied models are written with `tie_word_embeddings: false` and an explicit
        `scale_decoder_outputs`, so 5.x neither ties the head nor mis-scales.
        """
        architecture = {"mt5": "MT5", "longt5": "LongT5"}.get(self.model_type, "T5")
        hf = {
            "architectures": [f"{architecture}ForConditionalGeneration"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": self.dense_act_fn,
            "is_gated_act": self.is_gated_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": True,
            "dropout_rate": 0.0,
            "initializer_factor": 1.0,
        }
        if self.max_source_length is not None:
            hf["n_positions"] = self.max_source_length
        if self.is_longt5:
            hf["encoder_attention_type"] = self.encoder_attention_type
            hf["local_radius"] = self.local_radius
            hf["global_block_size"] = self.global_block_size
        return hf

    def to_hf_config(self) -> Any:
        """The equivalent `transformers` config object (T5Config, MT5Config or LongT5Config)."""
        import transformers

        cls = {"mt5": transformers.MT5Config, "longt5": transformers.LongT5Config}.get(
            self.model_type, transformers.T5Config
        )
        return cls(**{k: v for k, v in self.to_hf_dict().items() if k != "architectures"})

    # ------------------------------------------------------------------ our own serialisation

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> T5Config:
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown T5Config fields {unknown}; valid: {sorted(known)}.")
        return cls(**data)
