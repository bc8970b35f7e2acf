"""Post-training: SFT on chat data, DPO/IPO/SimPO, GRPO and distillation, on the same Run
builder, train loop, checkpoints and ledger as pretraining (README "Post-training")."""
