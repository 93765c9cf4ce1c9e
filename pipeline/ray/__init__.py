"""The runtime on Ray: Ray Train workers, Tune trials, the driver. Imports core and io; the only layer that
imports ray."""
