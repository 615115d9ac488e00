defmodule Capsid.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Capsid.Telemetry.setup()

    if limit = Application.get_env(:capsid, :address_space_limit) do
      Capsid.Native.node_configure(limit)
    end

    children = [
      Capsid.Registry,
      Capsid.Cluster,
      {Registry, keys: :unique, name: Capsid.Deployments},
      {DynamicSupervisor, name: Capsid.DeploymentSupervisor, strategy: :one_for_one}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Capsid.Supervisor)
  end
end
