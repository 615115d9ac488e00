defmodule Capsid.ValuesTest do
  @moduledoc "Round trips of every WIT value type through the toolkit guest's echo functions."
  use ExUnit.Case, async: true

  import Capsid.TestHelpers

  setup_all do
    {:ok, pid} = Capsid.Instance.start_link(component: toolkit(), imports: toolkit_imports(self()))

    %{pid: pid}
  end

  defp echo(pid, fun, value), do: Capsid.call(pid, "echo-" <> fun, [value])

  defp round_trip(pid, fun, value) do
    assert echo(pid, fun, value) == {:ok, value}
  end

  test "bool", %{pid: pid} do
    round_trip(pid, "bool", true)
    round_trip(pid, "bool", false)
  end

  test "integers at their edges", %{pid: pid} do
    for {fun, min, max} <- [
          {"s8", -128, 127},
          {"u8", 0, 255},
          {"s16", -32_768, 32_767},
          {"u16", 0, 65_535},
          {"s32", -2_147_483_648, 2_147_483_647},
          {"u32", 0, 4_294_967_295},
          {"s64", -9_223_372_036_854_775_808, 9_223_372_036_854_775_807},
          {"u64", 0, 18_446_744_073_709_551_615}
        ] do
      round_trip(pid, fun, min)
      round_trip(pid, fun, max)
      round_trip(pid, fun, div(max, 3))
    end
  end

  test "floats, integers accepted, special values as atoms", %{pid: pid} do
    round_trip(pid, "f64", 3.141592653589793)
    round_trip(pid, "f64", -0.0)
    round_trip(pid, "f64", 1.7976931348623157e308)
    round_trip(pid, "f32", 1.5)
    assert echo(pid, "f32", 0.1) == {:ok, 0.10000000149011612}
    assert echo(pid, "f64", 7) == {:ok, 7.0}

    for special <- [:nan, :infinity, :neg_infinity] do
      round_trip(pid, "f64", special)
      round_trip(pid, "f32", special)
    end
  end

  test "char", %{pid: pid} do
    round_trip(pid, "char", ?a)
    round_trip(pid, "char", ?é)
    round_trip(pid, "char", 0x1F600)
    round_trip(pid, "char", 0x10FFFF)
    round_trip(pid, "char", 0)
  end

  test "strings, empty and non-ASCII", %{pid: pid} do
    round_trip(pid, "string", "")
    round_trip(pid, "string", "hello")
    round_trip(pid, "string", "héllo wörld — 日本語 😀")
    round_trip(pid, "string", String.duplicate("abc", 100_000))
  end

  test "list<u8> as binary; a list of bytes accepted", %{pid: pid} do
    round_trip(pid, "bytes", <<>>)
    round_trip(pid, "bytes", <<0, 1, 2, 255>>)
    round_trip(pid, "bytes", :crypto.strong_rand_bytes(70_000))
    assert echo(pid, "bytes", [1, 2, 3]) == {:ok, <<1, 2, 3>>}
  end

  test "lists", %{pid: pid} do
    round_trip(pid, "list", [])
    round_trip(pid, "list", [1, -2, 2_147_483_647])
    round_trip(pid, "strings", [])
    round_trip(pid, "strings", [[], ["a"], ["ü", "", "c"]])
  end

  test "tuple", %{pid: pid} do
    round_trip(pid, "tuple", {255, "x", 2.5})
  end

  test "record with kebab-case field", %{pid: pid} do
    round_trip(pid, "point", %{x: 1.0, y: -2.5, label_text: "origin"})
    round_trip(pid, "point", %{x: 0.0, y: 0.0, label_text: nil})
  end

  test "variants with and without payload", %{pid: pid} do
    round_trip(pid, "shape", {:circle, 2.0})
    round_trip(pid, "shape", {:rectangle, {1.0, 2.0}})
    round_trip(pid, "shape", {:polygon, []})
    round_trip(pid, "shape", {:polygon, [%{x: 1.0, y: 2.0, label_text: nil}]})
    round_trip(pid, "shape", :empty)
  end

  test "enums, including multi-word cases", %{pid: pid} do
    for c <- [:red, :green, :blue, :dark_slate_gray], do: round_trip(pid, "color", c)
  end

  test "flags: declaration order in results, MapSet accepted", %{pid: pid} do
    round_trip(pid, "permissions", [])
    round_trip(pid, "permissions", [:read, :write, :execute, :admin_access])
    assert echo(pid, "permissions", [:admin_access, :read]) == {:ok, [:read, :admin_access]}
    assert echo(pid, "permissions", MapSet.new([:write, :read])) == {:ok, [:read, :write]}
    assert echo(pid, "permissions", [:read, :read]) == {:ok, [:read]}
  end

  test "options, including nested options", %{pid: pid} do
    round_trip(pid, "option", nil)
    round_trip(pid, "option", 0)
    round_trip(pid, "option", 4_294_967_295)
    round_trip(pid, "nested-option", nil)
    round_trip(pid, "nested-option", {:some, nil})
    round_trip(pid, "nested-option", {:some, "x"})
  end

  test "results with and without payloads", %{pid: pid} do
    round_trip(pid, "result", {:ok, 7})
    round_trip(pid, "result", {:error, "bad"})
    round_trip(pid, "unit-result", :ok)
    round_trip(pid, "unit-result", :error)
    round_trip(pid, "ok-only", {:ok, "fine"})
    round_trip(pid, "ok-only", :error)
    round_trip(pid, "err-only", :ok)
    round_trip(pid, "err-only", {:error, 42})
  end

  test "a deeply nested record", %{pid: pid} do
    nested = %{
      name: "nested ✓",
      points: [%{x: 1.0, y: 2.0, label_text: "a"}, %{x: 3.0, y: 4.0, label_text: nil}],
      shape: {:polygon, [%{x: 0.5, y: 0.25, label_text: "p"}]},
      color: :dark_slate_gray,
      perms: [:read, :admin_access],
      maybe_maybe: {:some, 5},
      outcome: {:ok, <<1, 2, 3>>},
      pairs: [{?λ, -9_223_372_036_854_775_808}, {?z, 9_223_372_036_854_775_807}]
    }

    round_trip(pid, "nested", nested)
    round_trip(pid, "nested", %{nested | color: nil, maybe_maybe: nil, outcome: {:error, "e"}})
    round_trip(pid, "nested", %{nested | maybe_maybe: {:some, nil}, points: [], pairs: []})
  end

  test "several parameters, and no result", %{pid: pid} do
    assert Capsid.call(pid, "echo-many", [true, 18_446_744_073_709_551_615, "ß", <<9>>]) ==
             {:ok, {true, 18_446_744_073_709_551_615, "ß", <<9>>}}

    assert Capsid.call(pid, "noop", []) == {:ok, nil}
  end
end
