"""Longer, plain-words explanations of the knobs, shown under the engine's own help in tooltips.

The engine's field metadata says what a setting is; these lines say what turning it up or down
does to a run, for the knobs people most often tune. Keys are ``section.key``.
"""

from __future__ import annotations

EXTRA: dict[str, str] = {
    "train.learning_rate": (
        "If the loss jumps around or turns into NaN, lower it (halve it). If the loss falls very slowly, "
        "raise it. LoRA usually wants 1e-4 to 3e-4, ten times what full fine-tuning uses."
    ),
    "train.lr_scheduler_type": (
        "cosine and linear decay the learning rate towards zero by the end, which usually gives the "
        "lowest final loss; constant keeps it flat, handy for exploring."
    ),
    "train.warmup_ratio": (
        "A short ramp (a few percent of the run) avoids big, badly-aimed first steps while the "
        "optimizer's statistics are still empty."
    ),
    "train.optim": (
        "adamw_torch is the safe default. paged_adamw_32bit / 8bit cut optimizer memory on a GPU "
        "(bitsandbytes). Changing it mid-run keeps Adam's moments when both sides are Adam-like."
    ),
    "train.per_device_train_batch_size": (
        "Bigger batches give smoother gradients and more tokens/s until memory runs out. "
        "Effective batch = batch size x gradient accumulation."
    ),
    "train.gradient_accumulation_steps": (
        "Use it to reach a large effective batch on a small GPU: 4 x 8 trains like 32 at the memory "
        "cost of 4, at the speed of 32 forward/backward passes. Changing it live recounts the remaining steps."
    ),
    "train.max_grad_norm": (
        "Clipping stops a single bad batch from throwing the weights far off. Watch the gradient-norm "
        "plot: if it sits far above this value all the time, clipping is doing most of the steering."
    ),
    "train.weight_decay": "Small values (0.01 to 0.1) can reduce overfitting on small datasets; 0 is common for LoRA.",
    "train.num_train_epochs": (
        "More epochs learn the data more closely; on small datasets, watch the eval loss: when it "
        "rises while the training loss falls, the model is memorising."
    ),
    "train.max_steps": "Handy for a quick trial: stop after a fixed number of steps whatever the data size.",
    "train.eval_steps": "Each evaluation pauses training for a moment; the eval loss shows up as dots on the loss plot.",
    "train.save_steps": "Checkpoints let you resume or pick an earlier adapter if a run later goes wrong.",
    "data.max_length": (
        "Memory and time per step grow with it (attention grows faster still). Set it just above the "
        "length of your typical example."
    ),
    "lora.r": (
        "8 to 64 covers most uses. More rank can learn more but trains more parameters and overfits "
        "small datasets sooner."
    ),
    "lora.alpha": "A common rule is alpha = 2 x r. Raising alpha acts like raising the learning rate of the adapters.",
    "lora.dropout": "0.05 to 0.1 helps on small datasets; 0 for large ones or quick runs.",
    "lora.target_modules": (
        "Attention projections (q_proj, k_proj, v_proj, o_proj) are the classic choice; all-linear also "
        "adapts the MLP layers: more capacity, more memory."
    ),
    "quantization": (
        "4-bit (QLoRA) lets a model about four times larger fit in the same GPU memory, at a small cost "
        "in speed and quality. Needs a CUDA GPU and bitsandbytes."
    ),
    "model.gradient_checkpointing": "Turn it on when you run out of memory with long examples or big batches.",
    "data.packing": "Speeds up training on many short examples; leaves long ones unchanged.",
}

LOCKED_TIP = (
    "Locked while a run goes: the model, the data and the shape of the run are fixed once training "
    "starts. Only these change live: {live}. Stop the run to change this."
)
