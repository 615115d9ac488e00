defmodule Capsid.BindingsAtomsTest do
  @moduledoc """
  The atom budget of `use Capsid.Bindings`. Not async: it counts the VM's
  atoms, which any test running beside it could add to.
  """
  use ExUnit.Case, async: false

  test "bindings that would create more atoms than a component may are refused" do
    dir = Path.join(System.tmp_dir!(), "capsid-bind-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf(dir) end)
    wasm = Path.join(dir, "many.wasm")
    # 6,000 exports: 6,000 `boundatomN!` names alone, and as many
    # without `!`; the limit is 10,000 per component (config :capsid,
    # :max_atoms_per_component). The names are this test's own: the atoms it
    # creates stay in the VM.
    File.write!(wasm, Capsid.Hostile.many_exports(6_000, "boundatom"))
    before = :erlang.system_info(:atom_count)
    assert {:error, message} = Capsid.TestHelpers.compile_bindings(wasm, CapsidManyExports, dir)
    assert message =~ "max_atoms_per_component"
    assert message =~ "10000"
    # It stopped at the budget.
    assert :erlang.system_info(:atom_count) - before <= 10_000 + 100
  end
end
