//! The Docker side of dm.
//!
//! - [`protocol`]: Docker's legacy `VolumeDriver` plugin protocol
//!   (`Plugin.Activate`, `VolumeDriver.Create`, ...) as serde types and a
//!   transport-independent dispatcher, [`protocol::handle`], over the small
//!   [`protocol::Backend`] trait that `dm server` implements. Malformed
//!   JSON, unknown endpoints and bad volume names are answered with
//!   `{"Err": "..."}` naming the problem; nothing here panics on input.
//! - [`docker`]: a minimal Docker Engine API client (HTTP over
//!   `/var/run/docker.sock`) to find the containers that use a dot and to
//!   stop and start them around a checkout or reset.
//!
//! Volume names follow `[namespace/]dot[@branch][.subdot]`
//! ([`dm_store::VolumeName`]).

pub mod docker;
pub mod protocol;

pub use docker::{Container, ContainerMount, DockerClient, DockerError};
pub use protocol::{handle, Backend, PluginError, VolumeInfo, DRIVER_NAME};
