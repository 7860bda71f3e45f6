//! The agent against AWS (moto_server behind the fault-injecting proxy): weather
//! and its classes, DynamoDB conflicts, the stack signal, join material and who
//! can reach it.
//!
//! One test binary for the area (linking is most of the suite's cost): one
//! module per former test file, `cargo nextest run -p kubeboot-tests --test aws <module>::`.

mod aws_weather;
mod aws_weather_classes;
mod awsproxy;
mod dynamo_conflicts;
mod join_material;
mod join_material_access;
mod ssm_weather;
mod stack_signal;
