defmodule Capsid.ErlangExampleTest do
  # The Erlang example of docs/erlang.md, run as written.
  use ExUnit.Case, async: true

  @example Path.expand("../../examples/erlang/capsid_example.erl", __DIR__)

  test "examples/erlang/capsid_example.erl runs against the toolkit component" do
    {:ok, module, beam, []} =
      :compile.file(String.to_charlist(@example), [:binary, :return, :warnings_as_errors])

    {:module, :capsid_example} = :code.load_binary(module, String.to_charlist(@example), beam)

    # Through the variable: the module does not exist when this file is
    # compiled, and Elixir 1.18 warns about a literal remote call to it.
    assert module.run(Capsid.Guests.path(:toolkit)) == :ok
  end
end
