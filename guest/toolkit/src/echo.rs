//! `acme:toolkit/echo`: identity functions, one per WIT value type, so the
//! host's lifting and lowering can be tested by round trips.

use crate::Toolkit;
use crate::bindings::exports::acme::toolkit::echo::{
    Color, Guest, Nested, Permissions, Point, Shape, Tristate,
};

impl Guest for Toolkit {
    fn echo_bool(v: bool) -> bool {
        v
    }

    fn echo_s8(v: i8) -> i8 {
        v
    }

    fn echo_u8(v: u8) -> u8 {
        v
    }

    fn echo_s16(v: i16) -> i16 {
        v
    }

    fn echo_u16(v: u16) -> u16 {
        v
    }

    fn echo_s32(v: i32) -> i32 {
        v
    }

    fn echo_u32(v: u32) -> u32 {
        v
    }

    fn echo_s64(v: i64) -> i64 {
        v
    }

    fn echo_u64(v: u64) -> u64 {
        v
    }

    fn echo_f32(v: f32) -> f32 {
        v
    }

    fn echo_f64(v: f64) -> f64 {
        v
    }

    fn echo_char(v: char) -> char {
        v
    }

    fn echo_string(v: String) -> String {
        v
    }

    fn echo_bytes(v: Vec<u8>) -> Vec<u8> {
        v
    }

    fn echo_list(v: Vec<i32>) -> Vec<i32> {
        v
    }

    fn echo_strings(v: Vec<Vec<String>>) -> Vec<Vec<String>> {
        v
    }

    fn echo_tuple(v: (u8, String, f64)) -> (u8, String, f64) {
        v
    }

    fn echo_point(v: Point) -> Point {
        v
    }

    fn echo_shape(v: Shape) -> Shape {
        v
    }

    fn echo_color(v: Color) -> Color {
        v
    }

    fn echo_permissions(v: Permissions) -> Permissions {
        v
    }

    fn echo_maybe_tristate(v: Option<Tristate>) -> Option<Tristate> {
        v
    }

    fn echo_option(v: Option<u32>) -> Option<u32> {
        v
    }

    fn echo_nested_option(v: Option<Option<String>>) -> Option<Option<String>> {
        v
    }

    fn echo_result(v: Result<u32, String>) -> Result<u32, String> {
        v
    }

    fn echo_unit_result(v: Result<(), ()>) -> Result<(), ()> {
        v
    }

    fn echo_ok_only(v: Result<String, ()>) -> Result<String, ()> {
        v
    }

    fn echo_err_only(v: Result<(), u32>) -> Result<(), u32> {
        v
    }

    fn echo_nested(v: Nested) -> Nested {
        v
    }

    fn echo_many(a: bool, b: u64, c: String, d: Vec<u8>) -> (bool, u64, String, Vec<u8>) {
        (a, b, c, d)
    }

    fn noop() {}
}
