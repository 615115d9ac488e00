defmodule Capsid.TestHelpers do
  @moduledoc false
  import ExUnit.Callbacks, only: [start_supervised!: 1]

  def toolkit, do: Capsid.Component.load!(Capsid.Guests.path(:toolkit))

  def toolkit_imports(test_pid \\ self(), config \\ %{}) do
    %{
      "log" => fn level, msg -> send(test_pid, {:guest_log, level, msg}) end,
      "get-config" => fn key -> Map.get(config, key) end
    }
  end

  @doc "Starts a supervised toolkit instance; returns its pid."
  def start_toolkit(opts \\ []) do
    opts = Keyword.merge([component: toolkit(), imports: toolkit_imports()], opts)
    start_supervised!(Supervisor.child_spec({Capsid.Instance, opts}, id: make_ref()))
  end
end
