defmodule :telemetry do
  @moduledoc false
  # A stand-in for the :telemetry library (not installable here: no hex),
  # with the two functions Capsid's tests need, same signatures. Capsid only
  # ever calls execute/3, and only when a module named :telemetry is loaded.

  def attach(id, event, fun, config) do
    :persistent_term.put({__MODULE__, id}, {event, fun, config})
    ids = :persistent_term.get({__MODULE__, :ids}, [])
    :persistent_term.put({__MODULE__, :ids}, [id | ids])
    :ok
  end

  def detach(id) do
    :persistent_term.erase({__MODULE__, id})
    ids = :persistent_term.get({__MODULE__, :ids}, [])
    :persistent_term.put({__MODULE__, :ids}, List.delete(ids, id))
    :ok
  end

  def execute(event, measurements, metadata) do
    for id <- :persistent_term.get({__MODULE__, :ids}, []),
        {^event, fun, config} <- [:persistent_term.get({__MODULE__, id}, nil)] do
      fun.(event, measurements, metadata, config)
    end

    :ok
  end
end
