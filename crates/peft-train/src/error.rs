//! [`TrainError`]: what can stop a training run, for the trainer and the collectives of a
//! distributed one alike (its own module, so that neither imports the other for it).

use std::path::PathBuf;

use peft_core::PeftError;

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A library error (model, adapter, files).
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// Bad settings.
    #[error("training config: {0}")]
    Config(String),
    /// The loss became NaN or infinite; the last good checkpoint (if any) is kept.
    #[error("loss is {loss} at step {step}: training stopped{}", last_checkpoint.as_ref().map(|p| format!("; last good checkpoint: {}", p.display())).unwrap_or_default())]
    NonFiniteLoss {
        /// The optimizer step.
        step: usize,
        /// The loss value.
        loss: f32,
        /// The newest checkpoint written before.
        last_checkpoint: Option<PathBuf>,
    },
    /// The gradients' norm became NaN or infinite with a finite loss; the step was not applied
    /// and no checkpoint was written after it.
    #[error("gradient norm is {norm} at step {step} (loss {loss}): training stopped before the update{}", last_checkpoint.as_ref().map(|p| format!("; last good checkpoint: {}", p.display())).unwrap_or_default())]
    NonFiniteGradient {
        /// The optimizer step.
        step: usize,
        /// The global L2 norm of the accumulated gradients.
        norm: f64,
        /// The step's (finite) loss.
        loss: f32,
        /// The newest checkpoint written before.
        last_checkpoint: Option<PathBuf>,
    },
    /// The ranks of a distributed run could not exchange their gradients (a rank died, hangs,
    /// or the transport failed).
    #[error("distributed training: {0}")]
    Distributed(String),
    /// A checkpoint could not be read back.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
