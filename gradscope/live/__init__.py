"""The live log: a Monitor's figures and findings streamed to W&B, MLflow, TensorBoard or a function of
yours while the run goes on (``Monitor(model, log=...)``). See :mod:`gradscope.live.log`."""
from .findings import Event
from .log import LiveLog
from .sinks import CallableSink, MlflowSink, Sink, TensorBoardSink, WandbSink

__all__ = ["CallableSink", "Event", "LiveLog", "MlflowSink", "Sink", "TensorBoardSink", "WandbSink"]
