defmodule Capsid.ErlangExampleTest do
  # The Erlang example of docs/erlang.md, run as written.
  use ExUnit.Case, async: true

  @example Path.expand("../../examples/erlang/capsid_example.erl", __DIR__)

  test "examples/erlang/capsid_example.erl runs against the toolkit component" do
    {:ok, module, beam, []} =
      :compile.file(String.to_charlist(@example), [:binary, :return, :warnings_as_errors])

    {:module, :capsid_example} = :code.load_binary(module, String.to_charlist(@example), beam)

    assert :capsid_example.run(Capsid.Guests.path(:toolkit)) == :ok
  end
end
