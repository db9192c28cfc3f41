"""On-policy distillation (OPD) of ARK-ASR on Ray.

A student transcribes (rollout), a frozen teacher scores the student's own tokens at the union of
both models' top-k ids (teacher scorer), and the learner minimises the forward KL(teacher || student)
over those ids plus one tail bucket (`ark_ray.opd.loss`). Modules are imported explicitly
(`from ark_ray.opd.loss import opd_kl_loss`) so that the pure-torch loss does not pull in Ray.
"""
