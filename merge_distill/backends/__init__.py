"""Optional inference engines beside the built-in transformers ones. `merge_distill.backends.vllm` (`pip install
'merge-distill[vllm]'`, CUDA only) implements the `Sampler` protocol of `merge_distill.engines`, which picks the
student's rollout engine per a recipe's `backend.rollout` (`make_sampler`)."""
