# like diffusers' ControlNet examples: each ControlNet loaded on its own and passed into the pipeline (two or
# more: as a list, which diffusers makes one MultiControlNetModel)
import argparse
import json

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--controlnet", action="append", required=True)
parser.add_argument("--report", required=True)
args = parser.parse_args()
nets = [ControlNetModel.from_pretrained(path, dtype=torch.bfloat16) for path in args.controlnet]
controlnet = nets[0] if len(nets) == 1 else nets
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    args.model, controlnet=controlnet, dtype=torch.bfloat16
)
edges = Image.fromarray((np.indices((32, 32)).sum(0) % 8 < 4).astype(np.uint8) * 255).convert("RGB")
image = pipe(
    "a cat",
    image=edges if len(nets) == 1 else [edges] * len(nets),
    num_inference_steps=1,
    height=32,
    width=32,
    output_type="np",
).images[0]
layers = lambda m: sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})  # noqa: E731
with open(args.report, "w") as f:
    json.dump(
        {
            "unet": layers(pipe.unet),
            "controlnet": layers(pipe.controlnet),
            "nets": [layers(n) for n in nets],
            "text_encoder": layers(pipe.text_encoder),
            "image": list(image.shape),
            "finite": bool(np.isfinite(image).all()),
        },
        f,
    )
