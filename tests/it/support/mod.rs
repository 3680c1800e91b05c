//! Helpers shared by the integration tests: the app under test, the real registry, the Docker
//! Hub fake.
#![allow(dead_code)]

pub mod app;
pub mod hub;
pub mod redis;
pub mod registry;
