//! Helpers shared by the integration tests: the real registry, the Docker Hub fake, the app under test.
#![allow(dead_code)]

pub mod hub;
pub mod registry;
