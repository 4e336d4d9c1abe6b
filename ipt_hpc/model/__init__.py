"""The model side: ``train`` (Megatron-Core pre-training), ``export`` (to Hugging Face), ``evaluate``
(lm-eval) and ``finetune_synthesizer`` (the instruction synthesizer's own fine-tuning)."""
