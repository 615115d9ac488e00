defmodule Capsid.AdoptionHelpers do
  @moduledoc false
  # Helpers for the tests of Capsid as a dependency: mix tasks, compilers,
  # prebuilt NIFs, fresh applications.
  import ExUnit.Callbacks, only: [on_exit: 1]

  @doc "A fresh directory under the system's temp dir, removed after the test."
  def tmp_dir!(label) do
    dir = Path.join(System.tmp_dir!(), "capsid-#{label}-#{System.unique_integer([:positive])}")
    File.rm_rf!(dir)
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf(dir) end)
    dir
  end

  @doc """
  Sets environment variables (`nil` deletes one) for the rest of the test,
  restoring them afterwards. Only for tests that are not `async`.
  """
  def put_env(vars) do
    old = for {name, _} <- vars, do: {name, System.get_env(name)}
    Enum.each(vars, &set_env/1)
    on_exit(fn -> Enum.each(old, &set_env/1) end)
  end

  defp set_env({name, nil}), do: System.delete_env(name)
  defp set_env({name, value}), do: System.put_env(name, value)

  @doc """
  Runs `fun` in `dir` as the Mix project `app` (no mix.exs needed; its
  manifests go under `dir/_build`).
  """
  def in_project(app, dir, config \\ [], fun) do
    Mix.Project.in_project(app, dir, [app: app] ++ config, fn _ -> fun.() end)
  end
end
