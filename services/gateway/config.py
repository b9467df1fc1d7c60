"""GatewayConfig: the HTTP gateway's options (each one a flag and an XLLM_* variable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xllm.config import SloConfig, option


@dataclass(frozen=True)
class GatewayConfig(SloConfig):
    """The gateway's options; the SLO targets (`SloConfig`) come first."""

    host: str = option("0.0.0.0", "Address the HTTP server listens on.")
    port: int = option(8000, "Port the HTTP server listens on.")
    model: str = option(
        "", "Model folder: tokenizer.json, chat template and config.json (for the context length)."
    )
    served_model_name: str = option(
        "", "The model name clients put in `model`; empty = the model folder's name."
    )
    max_model_len: int = option(
        0, "Context length (prompt + output tokens); 0 = config.json's max_position_embeddings."
    )
    api_key: str = option(
        "", "Require `Authorization: Bearer <key>` on /v1/*, /tokenize, /detokenize; empty = open."
    )
    max_body_bytes: int = option(4 * 1024 * 1024, "Largest request body accepted (413 beyond).")
    max_inflight: int = option(512, "Most generation requests in flight at once (429 beyond).")
    request_timeout: float = option(600.0, "Seconds a generation may take end to end (504 after).")
    submit_timeout: float = option(5.0, "Seconds to wait for the scheduler to place a request.")
    placement_wait: float = option(
        30.0,
        "Seconds a request waits for a live scheduler and instance (one restarting, a role "
        "still loading) before it gets 503 with Retry-After.",
    )
    offline_concurrency: int = option(
        8, "Offline jobs (NATS `xllm.offline.submit`) this gateway runs at once; 0 = none."
    )
    supervisor_state: str = option(
        "", "JSON file where `xllm up`'s supervisor reports its processes (set by it)."
    )
    cluster_timeout: float = option(
        1.0, "Seconds to wait for the scheduler's cluster view (/health, /cluster, /metrics)."
    )

    max_images_per_request: int = option(4, "Most images in one chat request (400 beyond).")
    max_image_bytes: int = option(512 * 1024, "Largest encoded image accepted (400 beyond).")
    max_request_image_bytes: int = option(
        768 * 1024,
        "Most image bytes in one request (400 beyond): they travel inside its NATS messages, "
        "which the server caps (1 MB by default).",
    )
    max_image_pixels: int = option(
        4096 * 4096, "Largest image, in pixels, accepted (checked before it is decoded)."
    )
    image_local_dir: str = option(
        "", "Folder whose files `file://` image URLs may name; empty = local files refused."
    )
    image_url_hosts: str = option(
        "", "Comma-separated hosts whose http(s) image URLs are fetched; empty = none."
    )
    image_fetch_timeout: float = option(5.0, "Seconds an http(s) image may take to fetch.")

    def validate(self) -> None:
        checks = [
            (bool(self.model), "give the model folder with --model (or XLLM_MODEL)"),
            (0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}"),
            (self.max_model_len >= 0, "--max-model-len must be 0 (from config.json) or positive"),
            (self.max_body_bytes > 0, "--max-body-bytes must be positive"),
            (self.max_inflight > 0, "--max-inflight must be positive"),
            (self.request_timeout > 0, "--request-timeout must be positive"),
            (self.submit_timeout > 0, "--submit-timeout must be positive"),
            (self.placement_wait >= 0, "--placement-wait cannot be negative"),
            (self.offline_concurrency >= 0, "--offline-concurrency cannot be negative"),
            (self.cluster_timeout > 0, "--cluster-timeout must be positive"),
            (self.max_images_per_request >= 0, "--max-images-per-request cannot be negative"),
            (self.max_image_bytes > 0, "--max-image-bytes must be positive"),
            (self.max_image_pixels > 0, "--max-image-pixels must be positive"),
            (self.image_fetch_timeout > 0, "--image-fetch-timeout must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        missing = [
            f for f in ("config.json", "tokenizer.json") if not (Path(self.model) / f).is_file()
        ]
        if missing:
            raise ValueError(
                f"--model {self.model} has no {' or '.join(missing)}: give a Hugging Face model "
                "folder (the one the instances serve)"
            )
