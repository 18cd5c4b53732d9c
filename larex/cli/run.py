"""`larex-run`: thin Hydra entry point over :func:`larex.stages.run.run`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://larex.configs", config_name="run")
def main(cfg: DictConfig) -> float | None:
    from larex.cli._errors import user_errors
    from larex.stages import common, evaluate, run

    with user_errors("larex-run"):  # the return value is the sweep objective (evaluate.objective, ID val only)
        ctx = evaluate.check_requirements(cfg)
        run.run(cfg, ctx)
        return evaluate.objective(cfg, ctx, required=common.optimizing())


if __name__ == "__main__":
    main()
