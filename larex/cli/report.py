"""`larex-report`: thin Hydra entry point over :func:`larex.stages.report.run`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://larex.configs", config_name="report")
def main(cfg: DictConfig) -> None:
    from larex.cli._errors import user_errors
    from larex.stages import report

    with user_errors("larex-report"):
        report.run(cfg)


if __name__ == "__main__":
    main()
