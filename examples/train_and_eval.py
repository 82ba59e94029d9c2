"""The Python API behind `lorakit train` and `lorakit eval`, as a notebook would use it.

    python examples/train_and_eval.py            # about as long as `make demo`
"""

from lorakit.evaluate import evaluate
from lorakit.precision import BF16_MIN_SPEEDUP, bf16_matmul_speedup
from lorakit.train import TrainConfig, lora_recipe, train

# bf16 autocast only where it is the faster: CPUs without bf16 units (AVX2 only) run it 5-8x slower.
bf16 = bf16_matmul_speedup() >= BF16_MIN_SPEEDUP

config = TrainConfig(
    base="smollm2",  # the embedded SmolLM2-135M-Instruct; or a local model directory / hub id
    data="src/lorakit/demo_data/train.jsonl",
    out="runs/example-adapter",
    lora=lora_recipe(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    epochs=1, lr=1e-3, batch_size=8, max_length=256, bf16=bf16,
)
result = train(config)
print(result.summary())

report = evaluate(base="smollm2", adapter=config.out, data="src/lorakit/demo_data/eval.jsonl",
                  batch_size=32, json_out="runs/example-adapter/eval.json", bf16=bf16)
print(report.table())
print(report.summary())
