defmodule Capsid.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Capsid.Telemetry.setup()
    Supervisor.start_link([Capsid.Registry], strategy: :one_for_one, name: Capsid.Supervisor)
  end
end
