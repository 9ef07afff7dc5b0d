# like a UI's checkpoint loader (A1111 / Fooocus style): one downloaded .safetensors file holding the whole
# SD pipeline in its original layout, a LoRA on top, then model offload; the config folder is given since
# no hub is reachable
import argparse
import json

import torch
from diffusers import StableDiffusionPipeline

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--config", required=True)
parser.add_argument("--report", required=True)
parser.add_argument("--lora", action="append", default=[])
parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (needs an accelerator)")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()
pipe = StableDiffusionPipeline.from_single_file(args.checkpoint, config=args.config, dtype=torch.bfloat16)
for i, lora in enumerate(args.lora):
    pipe.load_lora_weights(lora, adapter_name=f"lora{i}")
if args.offload:
    pipe.enable_model_cpu_offload()
else:
    pipe.to(args.device)
image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images[0]
layers = lambda m: sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})  # noqa: E731
with open(args.report, "w") as f:
    json.dump(
        {
            "unet": layers(pipe.unet),
            "text_encoder": layers(pipe.text_encoder),
            "adapters": pipe.get_active_adapters(),
            "lora_layers": sum(hasattr(x, "lora_A") for x in pipe.unet.modules()),
            "offloaded": getattr(pipe, "_offload_device", None) is not None,
            "ran_on": str(pipe._execution_device),
            "unet_on": str(pipe.unet.device),
            "image": list(image.shape),
            "finite": bool((image == image).all()),
        },
        f,
    )
