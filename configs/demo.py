"""The embedded demo model: a small T5 trained with FREE's loss to restore punctuation.

Command (from the repository root):

    free-jax train --config configs/demo.py

The task is `acl_punct` (`free_jax.data.demo`): unpunctuated sentences of ACL papers (the
`aclsum` package's text) back to the original. The model is a T5 v1.1-style
encoder-decoder (gated GELU, relative attention) with a 2048-piece SentencePiece vocabulary, tied
embeddings, a 4-block encoder and an 8-block decoder whose shallow exit is block 1. It trains
from random weights with the shallow-deep loss and KD-dyna, on length-grouped batches (56% of the
padded tokens of fixed 64-token shapes over an epoch).

The result, `runs/demo/final`, is what `free_jax/assets/demo/model/` ships (`free-jax demo` reads
it). Cost and quality: see `free_jax/assets/demo/model/TRAINING.md`, written from the shipped
run's `metrics.jsonl`.
"""

from free_jax import T5Config
from free_jax.data import demo
from free_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelSpec,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
)

ARCH = T5Config(
    vocab_size=demo.VOCAB_SIZE,
    d_model=128,
    d_kv=32,
    d_ff=512,
    num_heads=4,
    num_layers=4,
    num_decoder_layers=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dense_act_fn="gelu_new",
    is_gated_act=True,
    # Tied embeddings scale the decoder output by d_model**-0.5, so the initial logits are O(1);
    # an untied head at T5's init starts at a loss near 55 and wastes the first hundred steps.
    tie_word_embeddings=True,
    scale_decoder_outputs=True,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(arch=ARCH, tokenizer=str(demo.ASSETS / "tokenizer")),
        data=DataConfig(
            task=demo.TASK_NAME,
            source_length=64,
            target_length=64,
            batch_size=32,
            eval_batch_size=128,
            num_eval_batches=4,
            length_buckets=(24, 32, 40, 48),
            group_by_length=50,
        ),
        objective=ObjectiveConfig(kind="free", exit_layer=1, kd="dyna", alpha=0.5),
        # AdamW at a high rate: the paper's Adafactor at 1e-4 fine-tunes a pretrained model; this
        # one learns from random weights in 26-38 minutes of 2 CPU cores.
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=2e-3,
            schedule="cosine",
            warmup_steps=200,
            final_lr_fraction=0.05,
            weight_decay=0.01,
        ),
        checkpoint=CheckpointConfig(every=250, keep=2),
        eval=EvalConfig(every=500),
        # The FREE settings saved with the model (decode's defaults). The threshold is what
        # `free-jax calibrate` chose on the whole validation split: the lowest whose share of
        # the full model's punctuation F1 has a 95% bootstrap lower bound of at least 99%
        # (TRAINING.md, "Choosing the threshold"). No buffer bound means no deep pass is forced
        # (a 32-token bound forced half of them on the test sample).
        export=ExportConfig(free_jax=True, hf=False, threshold=0.5, buffer_capacity=None),
        steps=3000,
        seed=0,
        log_every=25,
        output_dir="runs/demo",
    )
