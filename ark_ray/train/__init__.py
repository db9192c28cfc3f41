"""What SFT and OPD share: the DeepSpeed learner group (`learner`), the SFT loop (`sft`) and every way
new weights reach the inference engines (`weight_sync`). Nothing here imports `ark_ray.opd`: the
learner takes its loss from the job."""
