defmodule Capsid.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Capsid.Telemetry.setup()

    Capsid.Budget.configure_from_env()

    children = [
      Capsid.Budget,
      Capsid.Registry,
      Capsid.Cluster,
      {Registry, keys: :unique, name: Capsid.Deployments},
      {DynamicSupervisor, name: Capsid.DeploymentSupervisor, strategy: :one_for_one}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Capsid.Supervisor)
  end
end
