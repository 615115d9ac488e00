defmodule Mix.Tasks.Compile.Capsid do
  @shortdoc "Builds the Capsid NIF and the guest components with cargo"
  @moduledoc """
  Runs cargo for `host_nif` (release, host target) and for every crate under
  `guest/` (release, `wasm32-wasip2`), then copies the results into `priv/`.

  Cargo is incremental and tracks `host_nif/**`, `guest/**` and the `wit/**`
  files that `wit_bindgen::generate!` reads, so running it on every
  `mix compile` costs well under a second when nothing changed.
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    root = File.cwd!()
    target_dir = System.get_env("CARGO_TARGET_DIR") || Path.join(root, "target")

    with :ok <- cargo(["build", "--release", "--quiet", "-p", "capsid_nif"], root),
         :ok <-
           cargo(
             ["build", "--release", "--quiet", "--target", "wasm32-wasip2"] ++
               Enum.flat_map(guest_crates(root), &["-p", &1]),
             root
           ) do
      copy(
        Path.join([target_dir, "release", "libcapsid_nif.so"]),
        Path.join([root, "priv", "native", "libcapsid_nif.so"])
      )

      for crate <- guest_crates(root) do
        copy(
          Path.join([target_dir, "wasm32-wasip2", "release", "#{crate}.wasm"]),
          Path.join([root, "priv", "guests", "#{crate}.wasm"])
        )
      end

      {:ok, []}
    end
  end

  defp guest_crates(root) do
    Path.wildcard(Path.join([root, "guest", "*", "Cargo.toml"]))
    |> Enum.map(&(&1 |> Path.dirname() |> Path.basename()))
    |> Enum.sort()
  end

  defp cargo(args, root) do
    case System.cmd("cargo", args, cd: root, into: IO.stream(:stdio, :line), stderr_to_stdout: true) do
      {_, 0} ->
        :ok

      {_, status} ->
        Mix.shell().error("cargo #{Enum.join(args, " ")} failed with status #{status}")
        {:error, []}
    end
  end

  # Copy only when the content changed, so a loaded NIF is not replaced
  # under a running VM for nothing.
  defp copy(from, to) do
    File.mkdir_p!(Path.dirname(to))

    unless File.exists?(to) and File.read!(from) == File.read!(to) do
      File.cp!(from, to)
    end
  end
end

defmodule Capsid.MixProject do
  use Mix.Project

  def project do
    [
      app: :capsid,
      version: "0.1.0",
      elixir: "~> 1.14",
      compilers: [:capsid] ++ Mix.compilers(),
      start_permanent: Mix.env() == :prod,
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      docs: [main: "Capsid"]
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto], mod: {Capsid.Application, []}]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
