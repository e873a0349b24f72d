"""The top floor: compose the stages into a run (``runner``) or a cost estimate (``dryrun``)."""
