//! Checkpoints of an [`AnyOptimizer`]: the dense checkpoint of whatever
//! optimizer it holds, the kind read back from the file.

use crate::any::AnyOptimizer;
use crate::{Algorithm, Error, Optimizer};

macro_rules! any_checkpoints {
    ($($module:ident { $($variant:ident($cfg:ident)),+ })*) => {
        impl AnyOptimizer {
            /// See [`Optimizer::save`].
            ///
            /// # Errors
            /// As [`Optimizer::save`].
            pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
                super::write_atomic(path.as_ref(), &self.to_safetensors()?)
            }

            /// An optimizer of whatever kind the checkpoint holds.
            ///
            /// # Errors
            /// As [`Optimizer::from_safetensors`].
            pub fn from_safetensors(bytes: &[u8]) -> Result<AnyOptimizer, Error> {
                let class = super::torch_class_of(bytes)?;
                $($(if class == <crate::$cfg as Algorithm>::TORCH_CLASS {
                    return Ok(Optimizer::<crate::$cfg>::from_safetensors(bytes)?.into());
                })+)*
                if class == crate::AdafactorConfig::TORCH_CLASS {
                    return Ok(crate::Adafactor::from_safetensors(bytes)?.into());
                }
                Err(Error::Checkpoint { reason: format!("unknown optimizer {class:?}") })
            }
        }
    };
}

crate::optim::for_each_optimizer!(any_checkpoints);
