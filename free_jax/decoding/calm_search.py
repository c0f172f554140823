"""CALM (Schuster et al., 2022), the early-exit baseline FREE is compared against.

Every token runs decoder blocks upward from the first; after each block from `min_layer` on
(below the last) its confidence is measured at the shared exit head, and the token exits at the
first block where the confidence beats a threshold that decays with the output position. The
blocks above the exit are skipped, and their keys and values at the token's position, which later
tokens attend to, are filled by **state copying** (`t5.copy_state_kv`): projected from the
exit's hidden state.

The decaying threshold. With λ the user's threshold, t the token's real output position (0 for the
first generated token) and N = `max_new_tokens`:

    λ_t = clip(0.9 · λ + 0.1 · exp(-τ · t / N), 0, 1),  τ = `tau` (4 by default)

This is the formula printed in the CALM paper. The t5x CALM code (and FREE's reference code, which
follows it) multiplies λ into the second term, `0.9·λ + 0.1·λ·exp(...)`, and never passes the
position, so its threshold is constant at λ; we use the paper's formula with the real position.
`tau=None` turns the decay off (λ_t = λ), which is what those codebases effectively run.

Batches. Rows exit independently: a row that exits keeps its exit state (so the blocks that still
run for other rows write state-copied K/V for it), and the batch stops climbing as soon as every
row has exited or finished, through one `lax.cond` per block (the only batch-level branch). At
batch 1 this is exactly CALM; at larger batches the deepest row sets the cost of a step, which is
how CALM's own implementation behaves.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from free_jax.decoding.confidence import exit_confidence
from free_jax.decoding.search import GreedyResult, greedy_search
from free_jax.decoding.xla_options import decode_jit
from free_jax.models import t5
from free_jax.models.config import T5Config
from free_jax.models.kv_cache import DecoderCache

Array = jax.Array

DEFAULT_TAU = 4.0


def decayed_threshold(
    threshold: Array, position: Array, max_new_tokens: int, tau: float | None
) -> Array:
    """λ_t for output position `position` (see the module docstring)."""
    threshold = jnp.asarray(threshold, jnp.float32)
    if tau is None:
        return threshold
    decay = jnp.exp(-tau * position.astype(jnp.float32) / max_new_tokens)
    return jnp.clip(0.9 * threshold + 0.1 * decay, 0.0, 1.0)


@flax.struct.dataclass
class CalmCarry:
    """What CALM's step carries besides the greedy search's own state.

    Attributes:
      cache: the decoder's KV cache (all L blocks, skipped ones state-copied).
      done: bool[B] the row has fed EOS back (it finished; it no longer holds the batch back).
      exit_layer: int32[B, T] blocks each token ran before its exit (L: no early exit).
      confidence: float32[B, T] the confidence that decided the exit (for tokens that ran every
        block, the last one measured, after block L - 1).
      full_depth_steps: int32[] steps at which some row ran all L blocks.
      full_depth_rows: int32[T] rows that ran all L blocks at each step.
    """

    cache: DecoderCache
    done: Array
    exit_layer: Array
    confidence: Array
    full_depth_steps: Array
    full_depth_rows: Array


@flax.struct.dataclass
class _Climb:
    """State of one token's climb through the blocks, per row."""

    hidden: Array  # [B, 1, D] residual stream (frozen at the exit state once a row exits)
    previous: Array  # [B, 1, D] the stream one block below (for "state_cosine")
    cache: DecoderCache
    exited: Array  # bool[B] the row has exited (or finished)
    logits: Array  # float32[B, V] exit logits of rows that exited on confidence
    layer: Array  # int32[B] blocks run before the exit
    confidence: Array  # float32[B]


@flax.struct.dataclass
class CalmResult:
    """Output of `calm_search`: `GreedyResult` fields plus the per-token diagnostics."""

    tokens: Array
    lengths: Array
    steps: Array
    exit_layer: Array
    confidence: Array
    num_deep_passes: Array
    pass_tokens: Array


def _confidence(name, params, config, climb: _Climb) -> tuple[Array, Array]:
    """(confidence float32[B], exit logits float32[B, V]) at the climb's current block."""
    hidden = climb.hidden[:, 0]
    logits = t5.exit_head(params, config, hidden)
    score = exit_confidence(name, params, config, logits, hidden, climb.previous[:, 0])
    return score, logits


def calm_step(
    params: t5.Params,
    config: T5Config,
    cache: DecoderCache,
    tokens: Array,
    done: Array,
    threshold: Array,
    *,
    min_layer: int,
    confidence: str,
    encoder_output: Array | None = None,
) -> tuple[Array, DecoderCache, Array, Array]:
    """One CALM decoding step for a batch.

    Args:
      tokens: int32[B] the tokens fed at this position.
      done: bool[B] rows that have finished (they count as exited from the start).
      threshold: float32[] the (already decayed) threshold; a row exits when its confidence is
        strictly greater.
      min_layer: the shallowest block a token may exit after, in [1, L - 1].
      encoder_output: [B, S, D]: fill a block's cross-attention K/V the first time a token
        climbs to it (for a cache made with `cross_layers=min_layer`); None: the cache has them.

    Returns:
      (logits float32[B, V], cache, exit layer int32[B], confidence float32[B]).
    """
    L = config.num_decoder_layers
    B = tokens.shape[0]
    x = t5.embed(params, tokens[:, None])  # [B, 1, D]
    want_states = confidence == "state_cosine"
    seg = t5.decoder_blocks(
        params, config, cache, x, start=0, stop=min_layer, return_block_states=want_states
    )
    previous = seg.block_states[-2] if want_states and min_layer > 1 else x
    climb = _Climb(
        hidden=seg.hidden,
        previous=previous,
        cache=seg.cache,
        exited=done,
        logits=jnp.zeros((B, config.vocab_size), jnp.float32),
        layer=jnp.full((B,), L, jnp.int32),
        confidence=jnp.full((B,), jnp.nan, jnp.float32),
    )

    def finish(c: _Climb) -> tuple[Array, DecoderCache, Array, Array]:
        # Every block ran: rows still climbing read the last block's exit.
        last = t5.exit_head(params, config, c.hidden[:, 0])
        logits = jnp.where((c.layer < L)[:, None], c.logits, last)
        return logits, c.cache, c.layer, c.confidence

    def climb_from(i: int, c: _Climb):
        """`c` holds the state after i blocks, min_layer <= i <= L."""
        if i == L:
            return finish(c)
        score, logits = _confidence(confidence, params, config, c)
        exits = ~c.exited & (score > threshold)
        c = c.replace(
            exited=c.exited | exits,
            logits=jnp.where(exits[:, None], logits, c.logits),
            layer=jnp.where(exits, i, c.layer),
            confidence=jnp.where(c.exited, c.confidence, score),
        )

        def skip_rest(c: _Climb):
            cache = t5.copy_state_kv(params, config, c.cache, c.hidden, start=i, stop=L)
            return c.logits, cache, c.layer, c.confidence

        def next_block(c: _Climb):
            cache = c.cache
            if encoder_output is not None:
                cache = t5.fill_cross_attention(
                    params, config, cache, encoder_output, start=i, stop=i + 1
                )
            out = t5.decoder_blocks(params, config, cache, c.hidden, start=i, stop=i + 1)
            # Exited rows keep their exit state: the block just ran on it, so its K/V for them
            # are state copies, and the blocks above will see the same state.
            hidden = jnp.where(c.exited[:, None, None], c.hidden, out.hidden)
            return climb_from(i + 1, c.replace(hidden=hidden, previous=c.hidden, cache=out.cache))

        return jax.lax.cond(jnp.all(c.exited), skip_rest, next_block, c)

    return climb_from(min_layer, climb)


@decode_jit(
    static_argnames=(
        "config",
        "min_layer",
        "max_new_tokens",
        "min_new_tokens",
        "confidence",
        "tau",
    ),
)
def calm_decode(
    params: t5.Params,
    encoder_output: Array,
    encoder_mask: Array,
    threshold: Array,
    *,
    config: T5Config,
    min_layer: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    confidence: str = "softmax_diff",
    tau: float | None = DEFAULT_TAU,
) -> CalmResult:
    """CALM greedy decoding, jitted; `threshold` is traced, so a new one never recompiles.

    Args:
      params: the parameters, in either layout (`Model.decode_params` saves a rearrangement).
      encoder_output, encoder_mask: [B, S, D] and int32[B, S], from
        `free_jax.decoding.encode_source`.
      threshold: float32[] λ before the position decay.
      min_layer: the shallowest block a token may exit after, in [1, L - 1].
      confidence: "softmax_diff", "softmax_max", "state_cosine" or "meta".
      tau: the decay's temperature τ; None for a constant threshold.
    """
    B, T = encoder_output.shape[0], max_new_tokens
    L = config.num_decoder_layers
    # A block's cross-attention K/V are computed the first time a token climbs to it.
    params, cache = t5.start_decoding(
        params, config, encoder_output, encoder_mask, max_new_tokens, cross_layers=min_layer
    )
    carry = CalmCarry(
        cache=cache,
        done=jnp.zeros((B,), bool),
        exit_layer=jnp.zeros((B, T), jnp.int32),
        confidence=jnp.full((B, T), jnp.nan, jnp.float32),
        full_depth_steps=jnp.zeros((), jnp.int32),
        full_depth_rows=jnp.zeros((T,), jnp.int32),
    )

    def step(carry: CalmCarry, tokens: Array, position: Array):
        done = carry.done | (tokens == config.eos_token_id)
        lam = decayed_threshold(threshold, position, max_new_tokens, tau)
        logits, cache, layer, score = calm_step(
            params,
            config,
            carry.cache,
            tokens,
            done,
            lam,
            min_layer=min_layer,
            confidence=confidence,
            encoder_output=encoder_output,
        )
        deep_rows = jnp.sum(~done & (layer == L)).astype(jnp.int32)
        carry = CalmCarry(
            cache=cache,
            done=done,
            exit_layer=carry.exit_layer.at[:, position].set(layer),
            confidence=carry.confidence.at[:, position].set(score),
            full_depth_steps=carry.full_depth_steps + (deep_rows > 0),
            full_depth_rows=carry.full_depth_rows.at[carry.full_depth_steps].set(deep_rows),
        )
        return logits, carry

    result: GreedyResult = greedy_search(
        step,
        carry,
        batch_size=B,
        max_new_tokens=max_new_tokens,
        start_id=config.decoder_start_token_id,
        eos_id=config.eos_token_id,
        pad_id=config.pad_token_id,
        min_new_tokens=min_new_tokens,
    )
    final: CalmCarry = result.cache
    return CalmResult(
        tokens=result.tokens,
        lengths=result.lengths,
        steps=result.steps,
        exit_layer=final.exit_layer,
        confidence=final.confidence,
        num_deep_passes=final.full_depth_steps,
        pass_tokens=final.full_depth_rows,
    )
