"""`ldm serve`: AUTOMATIC1111's /sdapi/v1 HTTP API over the pipeline (docs/serve.md).

`schemas`: A1111's request and response fields; `translate`: a request as the calls `ldm
generate` / `ldm img2img` / `ldm inpaint` make (with `sampling_names`, `controlnet_args`,
`images`); `workers` and `jobs`: one model per device, one FIFO queue, progress and interrupts;
`app` (with `responses`, `listings`, `checkpoints`): the FastAPI routes; `guard`: basic auth and
the body size limit on every request; `launch`: devices, models and uvicorn for the command.
"""
