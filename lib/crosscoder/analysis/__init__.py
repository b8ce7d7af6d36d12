"""Analysis of trained crosscoders: held-out metrics and decoder geometry (``metrics``), CE loss
recovered by splicing reconstructions into each model (``ce``), Latent Scaling (``scaling``), AUROC
against planted ground truth (``ground_truth``), clustering (``clustering``) and latent views
(``latents``)."""
