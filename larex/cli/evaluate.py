"""`larex-evaluate`: thin Hydra entry point over :func:`larex.stages.evaluate.run`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://larex.configs", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from larex.cli._errors import user_errors
    from larex.stages import common, evaluate

    with user_errors("larex-evaluate"):  # the return value is the sweep objective (evaluate.objective, ID val only)
        ctx = evaluate.check_requirements(cfg)
        evaluate.run(cfg, ctx)
        return evaluate.objective(cfg, ctx, required=common.optimizing())


if __name__ == "__main__":
    main()
