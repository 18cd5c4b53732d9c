"""`larex-score`: thin Hydra entry point over :func:`larex.stages.score.run`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://larex.configs", config_name="score")
def main(cfg: DictConfig) -> None:
    from larex.cli._errors import user_errors
    from larex.stages import score

    with user_errors("larex-score"):
        score.run(cfg)


if __name__ == "__main__":
    main()
