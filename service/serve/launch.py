"""The Serve config and its deployment: ``load_config`` reads the file with overrides, ``deploy``
takes Ray Serve's public path (``serve.start`` + ``serve.run``) with every setting read from the
config, so the YAML stays the truth. The local processes behind ``make serve`` are ``service.local``'s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from service.config import EngineConfig

if TYPE_CHECKING:  # app.py imports Ray Serve and the gRPC stubs: only when a caller needs it
    from service.serve.app import AppArgs

CONFIG = Path(__file__).with_name("serve_config.yaml")
APP = "kvcompose"


def load_config(path: Path = CONFIG, args: dict | None = None, deployments: dict | None = None,
                **top: object) -> dict:
    """The Serve config with overrides, each deep-merged (``deep_merge``): ``top`` into the top level
    (``grpc_options={"port": 9001}`` keeps the file's servicer functions), ``args`` into the app's
    builder args, ``deployments`` {name: {option: value}} into each deployment's options."""
    config = deep_merge(yaml.safe_load(Path(path).read_text()), top)
    app = next(a for a in config["applications"] if a["name"] == APP)
    deep_merge(app.setdefault("args", {}), args or {})
    for name, options in (deployments or {}).items():
        target = next((d for d in app["deployments"] if d["name"] == name), None)
        if target is None:
            raise ValueError(f"no deployment {name!r} in {path}")
        deep_merge(target, options)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema: fail before anything starts
    return config


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, dict by dict (any other value, lists too, replaces); returns
    ``base``, changed in place. ``extra`` is copied, so later changes to the result leave it as it was."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def deploy(config: dict) -> None:
    """Ray Serve's public path: ``serve.start`` with the config's proxy, gRPC and logging options,
    then ``serve.run`` of the application built with the config's args and deployment options (the
    app's ``runtime_env`` given to each deployment's actors). Returns when the app is RUNNING;
    deploying again updates it in place."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from service.serve.app import application

    schema = ServeDeploySchema.model_validate(config)
    if [a.name for a in schema.applications] != [APP]:
        raise ValueError(f"the config must hold the one application {APP!r}")
    (app,) = schema.applications
    serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump(),
                grpc_options=schema.grpc_options.model_dump(), logging_config=schema.logging_config)
    serve.run(application(app.args, deployment_options(app.model_dump(exclude_unset=True))), name=APP,
              route_prefix=app.route_prefix, logging_config=app.logging_config or schema.logging_config)


def deployment_options(app: dict) -> dict[str, dict]:
    """{deployment name: ``Deployment.options`` arguments} of one application of a Serve config,
    with the application's runtime_env (env_vars merged) in every deployment's actor options."""
    env = app.get("runtime_env") or {}
    options = {}
    for d in app.get("deployments", []):
        d = copy.deepcopy(d)
        name = d.pop("name")
        if env:
            actor = d.setdefault("ray_actor_options", {})
            own = actor.get("runtime_env") or {}
            actor["runtime_env"] = {**env, **own, "env_vars": {**env.get("env_vars", {}), **own.get("env_vars", {})}}
        options[name] = d
    return options


def give_redis_url(app: dict, redis_url: str) -> None:
    """Hand the store's Redis URL (with its password) to the deployments that write to Redis, the
    Compressors (caches) and the Ingress (tenant limits' shared counters), in their actors'
    ``runtime_env``: not in the app's args, and not to Decoders, which get the reader's URL only."""
    for writer in (d for d in app["deployments"] if d["name"] in ("Ingress", "Compressor")):
        actor = writer.setdefault("ray_actor_options", {})
        actor.setdefault("runtime_env", {}).setdefault("env_vars", {})["REDIS_URL"] = redis_url


def app_args(config: dict) -> AppArgs:
    """The kvcompose application's builder args of a Serve config, typed."""
    from service.serve.app import AppArgs

    app = next(a for a in config["applications"] if a["name"] == APP)
    return AppArgs(**app.get("args", {}))


def local_engine_overrides() -> tuple[dict, dict]:
    """(engine args, deployment options) from ``KVCOMPOSE_<FIELD>`` variables, over the config file's:
    ``KVCOMPOSE_DEVICE=cuda make serve`` runs on this machine's GPU in bfloat16 (unless
    ``KVCOMPOSE_COMPUTE_DTYPE`` says float16), the Compressor and the Decoder sharing it (half a GPU
    each in Ray's accounting)."""
    engine = EngineConfig.env_values()
    if "cache_dir" in engine:
        engine["cache_dir"] = str(engine["cache_dir"])  # Serve's args are plain data
    deployments = {}
    if engine.get("device", "cpu").startswith("cuda"):
        deployments = {name: {"ray_actor_options": {"num_gpus": 0.5}} for name in ("Compressor", "Decoder")}
        engine.setdefault("compute_dtype", "bfloat16")  # the file's float32 is the CPU's (refused on CUDA)
    return engine, deployments
