# a community pipeline, as in diffusers' examples/community: one file defining a pipeline class, loaded with
# DiffusionPipeline.from_pretrained(model, custom_pipeline="path/to/this_file.py")
import torch
from diffusers import DiffusionPipeline


class TwoStepTextToImage(DiffusionPipeline):
    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=2, height=32, width=32, seed=0):
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        dtype = self.unet.dtype
        cond = self.text_encoder(ids)[0].to(dtype)
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, self.unet.config.in_channels, height // scale, width // scale)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = self.scheduler.scale_model_input(latents, t)
            noise = self.unet(x, t, encoder_hidden_states=cond).sample
            latents = self.scheduler.step(noise, t, latents).prev_sample
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).float().numpy()
