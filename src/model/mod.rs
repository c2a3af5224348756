//! SD1.5's models, named and structured as diffusers defines them (DESIGN.md §4): weight loading
//! from every supported source ([`weights`]), the CLIP text encoder ([`clip`]) and the VAE ([`vae`]).

pub mod weights;
pub mod functional;
pub mod layers;
pub mod lora;
pub mod resnet;
pub mod transformer;
pub mod unet;
#[cfg(test)]
mod unet_tests;
